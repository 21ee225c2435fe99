"""ecm_jax.cluster: which launcher started a process, the devices it drives, and clear errors for
variables that describe no job (the two-process runs themselves: tests/test_train_e2e.py)."""

import os
import re
import subprocess
import sys

import pytest

from ecm_jax import cluster
from helpers import REPO

EXPLICIT = {'JAX_COORDINATOR_ADDRESS': '10.0.0.1:1234', 'JAX_NUM_PROCESSES': '4',
            'JAX_PROCESS_ID': '3'}
SLURM = {'SLURM_JOB_ID': '77', 'SLURM_STEP_NODELIST': 'node[01-02]', 'SLURM_NTASKS': '2',
         'SLURM_PROCID': '1', 'SLURM_LOCALID': '0', 'SLURM_NODEID': '1',
         'SLURM_STEP_TASKS_PER_NODE': '1(x2)'}
OMPI = {'OMPI_MCA_orte_hnp_uri': '1531576320.0;tcp://10.96.0.1:34911', 'OMPI_COMM_WORLD_SIZE': '8',
        'OMPI_COMM_WORLD_RANK': '5', 'OMPI_COMM_WORLD_LOCAL_RANK': '1',
        'OMPI_COMM_WORLD_LOCAL_SIZE': '4'}


def test_a_single_process_joins_nothing():
  assert cluster.detect({}) is None
  assert cluster.detect({'SLURM_JOB_ID': '7', 'SLURM_NTASKS': '1'}) is None
  assert cluster.detect(dict(EXPLICIT, JAX_NUM_PROCESSES='1', JAX_PROCESS_ID='0')) is None


def test_the_documented_variables_are_passed_to_jax_and_the_process_drives_all_its_devices():
  launch = cluster.detect(EXPLICIT)
  assert launch.launcher == 'explicit' and launch.num_processes == 4
  assert launch.initialize_args == {'coordinator_address': '10.0.0.1:1234', 'num_processes': 4,
                                    'process_id': 3, 'cluster_detection_method': 'deactivate'}
  assert launch.all_local_devices
  assert cluster.detect(dict(EXPLICIT, JAX_COORDINATOR_ADDRESS='[fe80::1]:99')) is not None


@pytest.mark.parametrize('environ, message', [
    ({'JAX_COORDINATOR_ADDRESS': '10.0.0.1:1234'},
     'JAX_COORDINATOR_ADDRESS set but JAX_NUM_PROCESSES, JAX_PROCESS_ID not'),
    ({'JAX_NUM_PROCESSES': '2', 'JAX_PROCESS_ID': '0'},
     'JAX_NUM_PROCESSES, JAX_PROCESS_ID set but JAX_COORDINATOR_ADDRESS not'),
    (dict(EXPLICIT, JAX_PROCESS_ID='4'),
     'JAX_PROCESS_ID=4 with JAX_NUM_PROCESSES=4: the process ids are 0..3'),
    (dict(EXPLICIT, JAX_NUM_PROCESSES='two'), "JAX_NUM_PROCESSES='two': must be an integer >= 1"),
    (dict(EXPLICIT, JAX_NUM_PROCESSES='0'), "JAX_NUM_PROCESSES='0': must be an integer >= 1"),
    (dict(EXPLICIT, JAX_COORDINATOR_ADDRESS='10.0.0.1'),
     "JAX_COORDINATOR_ADDRESS='10.0.0.1': give host:port of process 0"),
    ({'SLURM_JOB_ID': '7', 'SLURM_NTASKS': '4'},
     'SLURM_NTASKS=4 but this process was not started by srun'),
])
def test_inconsistent_or_partial_variables_are_named(environ, message):
  with pytest.raises(cluster.ClusterError, match=re.escape(message)):
    cluster.detect(environ)


@pytest.mark.parametrize('environ, launcher, all_local', [
    (SLURM, 'slurm', True),  # one task per node: all its GPUs
    (dict(SLURM, SLURM_STEP_TASKS_PER_NODE='4(x2)', SLURM_NTASKS='8'), 'slurm', False),
    (dict(SLURM, SLURM_STEP_TASKS_PER_NODE='4(x2)', CUDA_VISIBLE_DEVICES='3'), 'slurm', True),
    (dict(SLURM, SLURM_STEP_TASKS_PER_NODE='4,1', SLURM_NODEID='1'), 'slurm', True),
    (OMPI, 'ompi', False),  # four ranks per host: one GPU each (the local rank's)
    (dict(OMPI, OMPI_COMM_WORLD_LOCAL_SIZE='1'), 'ompi', True),
    (dict(OMPI, JAX_LOCAL_DEVICE_IDS='1'), 'ompi', False),  # the user's choice stands
    ({'TPU_WORKER_HOSTNAMES': 't0,t1'}, 'tpu', True),
])
def test_launchers_are_found_and_the_devices_per_process_follow_the_layout(environ, launcher,
                                                                          all_local):
  launch = cluster.detect(environ)
  assert launch.launcher == launcher
  assert launch.all_local_devices == all_local


def test_train_py_names_the_missing_variables_in_one_line(tmp_path):
  env = dict(os.environ, JAX_COORDINATOR_ADDRESS='127.0.0.1:1234', JAX_PLATFORMS='cpu')
  result = subprocess.run([sys.executable, str(REPO / 'train.py'), '--config',
                           str(REPO / 'configs/demo.py'), '--workdir', str(tmp_path / 'w')],
                          env=env, capture_output=True, text=True, timeout=120)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1] == (
      'error: JAX_COORDINATOR_ADDRESS set but JAX_NUM_PROCESSES, JAX_PROCESS_ID not: a '
      'multi-process job needs all of JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID '
      'in every process (or none of them for one process)')
  assert not (tmp_path / 'w').exists()
