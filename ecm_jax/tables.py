"""The one markdown table formatter (eval summaries, the results and models tables, the parity
report and the benchmarks all print through it)."""

from collections.abc import Sequence
from typing import Any


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]],
                   align: str | None = None) -> str:
  """A GitHub markdown table. `align`: one letter per column, 'l' (default) or 'r' (numbers)."""
  align = align or 'l' * len(header)
  if len(align) != len(header) or set(align) - {'l', 'r'}:
    raise ValueError(f'align needs one of l/r per column ({len(header)}), got {align!r}')
  bad = [row for row in rows if len(row) != len(header)]
  if bad:
    raise ValueError(f'rows need {len(header)} cells, got {bad[0]!r}')
  line = lambda cells: '| ' + ' | '.join(str(cell) for cell in cells) + ' |'
  rule = '|' + ''.join('---:|' if a == 'r' else '---|' for a in align)
  return '\n'.join([line(header), rule, *map(line, rows)])
