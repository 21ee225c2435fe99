"""benchmarks/device_check.sh --smoke: the device check's every section runs on the CPU at a tiny
size and lands in one markdown report with numbers (the GPU run itself needs a lent device)."""

import re
import subprocess

from helpers import REPO

SECTIONS = ('## Machine', '## Tests that need a device', '## Parity with PyTorch',
            '## Train step at 32x32', '## Scaling over the devices present',
            '## Input pipeline against the step')


def test_device_check_smoke_writes_every_section(tmp_path):
  report = tmp_path / 'device_check.md'
  done = subprocess.run([str(REPO / 'benchmarks/device_check.sh'), '--smoke', '--report',
                         str(report), '--budget', '400'], cwd=REPO, capture_output=True,
                        text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  text = report.read_text()
  for title in SECTIONS:
    assert title in text, title
  assert 'FAILED' not in text and 'Skipped: the run' not in text, text[-4000:]
  step = text.split('## Train step')[1].split('## Scaling')[0]
  # Every JAX and PyTorch row measured: images/s is a number.
  rows = [line for line in step.splitlines() if line.startswith('| unet') or
          line.startswith('| ec_cam_unet')]
  assert len(rows) == 2 + 2 + 1 + 1, step  # U-Net: 2 JAX, 2 PyTorch; full model: 1 + 1
  assert all(re.match(r'\| \S+ \| \S+ \| [^|]+ \| \S+ \| [0-9.]+ \|', r) for r in rows), rows
  assert 'exit 0' in text.split('## Parity')[1].split('## Train step')[0]
  assert 'exit 0' in text.split('## Scaling')[1].split('## Input')[0]
  assert re.search(r'\| +-?\d+ \| +[0-9.]+ \|', text.split('## Input pipeline')[1])
