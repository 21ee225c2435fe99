"""Joining a multi-process job: which launcher started this process and which devices it drives.

A job is one process per host (driving every accelerator of the host) or one per accelerator;
`jax.distributed.initialize` connects them through a coordination service on process 0. Found
from the environment, before JAX starts:
  explicit    JAX_COORDINATOR_ADDRESS=host:port JAX_NUM_PROCESSES=N JAX_PROCESS_ID=i (all three;
              optional JAX_LOCAL_DEVICE_IDS=0,1 restricts the process to those local devices);
  SLURM       tasks started by `srun` (SLURM_JOB_ID, SLURM_STEP_NODELIST, SLURM_NTASKS > 1, ...);
  Open MPI    ranks started by `mpirun` (OMPI_MCA_orte_hnp_uri, OMPI_COMM_WORLD_SIZE > 1, ...);
  Cloud TPU   a multi-host TPU VM slice (TPU_WORKER_HOSTNAMES lists several hosts).
JAX alone gives every SLURM or Open MPI process the one GPU of its local rank. Here a process
drives one GPU only where the launcher put several processes on a host that all see the same
GPUs; a process alone on its host, or one the launcher bound to a single GPU
(CUDA_VISIBLE_DEVICES with one entry), drives every GPU it can see.
"""

from collections.abc import Mapping
import dataclasses
import os
import re

from ecm_jax.errors import UserError

EXPLICIT_VARIABLES = ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID')


class ClusterError(UserError):
  """The launcher's variables do not describe a job this process can join (named in the message)."""


@dataclasses.dataclass(frozen=True)
class Launch:
  """How this process joins its job: `initialize_args` for `jax.distributed.initialize`, and
  whether it drives every local accelerator (else the one of its local rank, JAX's choice)."""
  launcher: str  # 'explicit' | 'slurm' | 'ompi' | 'tpu'
  num_processes: int | None  # None: the launcher's metadata says (Cloud TPU)
  initialize_args: dict
  all_local_devices: bool


def _integer(environ: Mapping[str, str], name: str, least: int) -> int:
  value = environ[name]
  if not re.fullmatch(r'\d+', value.strip()) or int(value) < least:
    raise ClusterError(f'{name}={value!r}: must be an integer >= {least}')
  return int(value)


def _explicit(environ: Mapping[str, str]) -> Launch | None:
  present = [name for name in EXPLICIT_VARIABLES if environ.get(name)]
  if not present:
    return None
  missing = [name for name in EXPLICIT_VARIABLES if name not in present]
  if missing:
    raise ClusterError(f'{", ".join(present)} set but {", ".join(missing)} not: a multi-process job '
                       f'needs all of {", ".join(EXPLICIT_VARIABLES)} in every process (or none of '
                       'them for one process)')
  address = environ['JAX_COORDINATOR_ADDRESS']
  if not re.fullmatch(r'(\[[0-9a-fA-F:]+\]|[^:\s]+):\d{1,5}', address):
    raise ClusterError(f'JAX_COORDINATOR_ADDRESS={address!r}: give host:port of process 0 (e.g. '
                       '10.0.0.1:12345), the same in every process')
  num_processes = _integer(environ, 'JAX_NUM_PROCESSES', 1)
  process_id = _integer(environ, 'JAX_PROCESS_ID', 0)
  if process_id >= num_processes:
    raise ClusterError(f'JAX_PROCESS_ID={process_id} with JAX_NUM_PROCESSES={num_processes}: the '
                       f'process ids are 0..{num_processes - 1}, one per process')
  if num_processes == 1:
    return None
  return Launch('explicit', num_processes,
                {'coordinator_address': address, 'num_processes': num_processes,
                 'process_id': process_id, 'cluster_detection_method': 'deactivate'},
                all_local_devices='JAX_LOCAL_DEVICE_IDS' not in environ)


def _slurm_tasks_on_this_node(environ: Mapping[str, str]) -> int:
  """Tasks of this job step on this node, from SLURM_STEP_TASKS_PER_NODE (e.g. '4(x2),3') and
  SLURM_NODEID."""
  counts = []
  for part in environ.get('SLURM_STEP_TASKS_PER_NODE', environ.get('SLURM_TASKS_PER_NODE',
                                                                   '1')).split(','):
    match = re.fullmatch(r'(\d+)(?:\(x(\d+)\))?', part.strip())
    if match:
      counts += [int(match.group(1))] * int(match.group(2) or 1)
  node = int(environ.get('SLURM_NODEID', '0'))
  return counts[node] if node < len(counts) else 1


def _one_gpu_bound(environ: Mapping[str, str]) -> bool:
  visible = environ.get('CUDA_VISIBLE_DEVICES')
  return visible is not None and len([d for d in visible.split(',') if d.strip()]) == 1


def detect(environ: Mapping[str, str] = os.environ) -> Launch | None:
  """The job this process belongs to (module doc), None for a single process; ClusterError for
  variables that are inconsistent or incomplete."""
  launch = _explicit(environ)
  if launch is not None or any(environ.get(name) for name in EXPLICIT_VARIABLES):
    return launch
  chosen = 'JAX_LOCAL_DEVICE_IDS' in environ  # the user's choice of local devices stands
  if 'SLURM_JOB_ID' in environ and int(environ.get('SLURM_NTASKS', '1')) > 1:
    if any(name not in environ for name in ('SLURM_STEP_NODELIST', 'SLURM_PROCID',
                                            'SLURM_LOCALID')):
      raise ClusterError(f'SLURM_NTASKS={environ["SLURM_NTASKS"]} but this process was not '
                         'started by srun: start every process with `srun python train.py ...` '
                         '(one task per process)')
    alone = _slurm_tasks_on_this_node(environ) == 1 or _one_gpu_bound(environ)
    return Launch('slurm', int(environ['SLURM_NTASKS']),
                  {'cluster_detection_method': 'slurm'}, all_local_devices=alone and not chosen)
  if 'OMPI_MCA_orte_hnp_uri' in environ and int(environ.get('OMPI_COMM_WORLD_SIZE', '1')) > 1:
    alone = int(environ.get('OMPI_COMM_WORLD_LOCAL_SIZE', '1')) == 1 or _one_gpu_bound(environ)
    return Launch('ompi', int(environ['OMPI_COMM_WORLD_SIZE']),
                  {'cluster_detection_method': 'ompi'}, all_local_devices=alone and not chosen)
  if ',' in environ.get('TPU_WORKER_HOSTNAMES', ''):
    return Launch('tpu', None, {}, all_local_devices=True)
  return None


def initialize(heartbeat_timeout_s: int) -> Launch | None:
  """Joins the job `detect` finds (nothing for a single process); returns it.

  heartbeat_timeout_s: a process silent this long (dead, or its host lost) makes the coordination
  service stop every other process, with a message that says so, instead of leaving them hanging
  in a collective.
  """
  launch = detect()
  if launch is None:
    return None
  import jax  # pylint: disable=g-import-not-at-top  (after the environment checks)
  try:
    jax.distributed.initialize(**launch.initialize_args,
                               heartbeat_timeout_seconds=heartbeat_timeout_s)
  except (RuntimeError, ValueError) as e:  # e.g. DEADLINE_EXCEEDED: not every process came
    where = launch.initialize_args.get('coordinator_address', f'the {launch.launcher} coordinator')
    raise ClusterError(
        f'could not join the {launch.num_processes or "multi"}-process job at {where} '
        f'({str(e).splitlines()[0][:200]}): start every process within the timeout, with the '
        'same coordinator address, and check that process 0 is reachable') from e
  if launch.all_local_devices and launch.launcher in ('slurm', 'ompi'):
    # JAX's cluster detection restricted the process to its local rank's GPU: drive all of them.
    jax.config.update('jax_cuda_visible_devices', 'all')
    jax.config.update('jax_rocm_visible_devices', 'all')
  return launch
