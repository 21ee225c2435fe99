"""Pictures of a run: learning curves, prediction overlays, attention heat maps (PNG, no display).

Figures are drawn with matplotlib's object API on the Agg canvas (no pyplot, no global backend),
at a fixed size: each PNG is `figsize * DPI` pixels. Every function writes its PNG atomically
(temporary file in the same folder, then `os.replace`) and returns the path. Pictures of the
synthetic demo data must say so: pass a `subtitle` (e.g. 'synthetic demo data'), printed under
the title.
"""

from collections.abc import Sequence
import json
import math
import pathlib

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
import numpy as np

from ecm_jax import files
from ecm_jax.evaluate import metrics

DPI = 100
LABEL_COLOR = '#00ff00'  # ground-truth contour
PRED_COLOR = '#ff00ff'  # predicted contour
HEATMAP_CMAP = 'jet'  # the paper's attention maps: activation from blue (low) to red (high)


def _figure(width_in: float, height_in: float) -> Figure:
  fig = Figure(figsize=(width_in, height_in), dpi=DPI, layout='constrained')
  FigureCanvasAgg(fig)
  return fig


def _set_titles(fig: Figure, title: str, subtitle: str | None) -> None:
  fig.suptitle(title if subtitle is None else f'{title}\n{subtitle}')


def _save(fig: Figure, out_png) -> pathlib.Path:
  """Writes `fig` to `out_png` atomically (`ecm_jax.files.atomic_path`)."""
  out = pathlib.Path(out_png)
  with files.atomic_path(out) as temporary:
    fig.savefig(temporary, format='png', dpi=DPI)
  return out


# --- Learning curves ------------------------------------------------------------------------------

def read_metrics_jsonl(path) -> list[dict]:
  """The records of a `metrics.jsonl` (one JSON object per line; blank lines skipped)."""
  path = pathlib.Path(path)
  records = []
  for number, line in enumerate(path.read_text().splitlines(), start=1):
    if not line.strip():
      continue
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError as e:
      raise ValueError(f'{path}:{number}: not a JSON object ({e.msg})') from e
  return records


def _series(records: Sequence[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
  rows = [(r['step'], r[key]) for r in records if key in r]
  steps = np.array([s for s, _ in rows], np.int64)
  return steps, np.array([v for _, v in rows], np.float64)


def ema(values: Sequence[float], weight: float) -> np.ndarray:
  """Debiased exponential moving average of weight w (w = 0 returns the values).

  s_t = w s_(t-1) + (1 - w) x_t from s_(-1) = 0, returned as s_t / (1 - w^(t+1)).
  """
  if not 0.0 <= weight < 1.0:
    raise ValueError(f'smoothing weight must be in [0, 1), got {weight}')
  smoothed = np.empty(len(values))
  running = 0.0
  for t, x in enumerate(values):
    running = weight * running + (1.0 - weight) * x
    smoothed[t] = running / (1.0 - weight ** (t + 1))
  return smoothed


def learning_curves(metrics_jsonl_path, out_png, *, title: str = 'Learning curves',
                    subtitle: str | None = None, smoothing: float = 0.9,
                    loss_key: str = 'train/loss', dice_key: str = 'val/dice') -> pathlib.Path:
  """Training loss per logged step (raw and `ema`-smoothed) and validation Dice, against step.

  1000 x 400 pixels. A log without validation entries yet gets an empty, labelled Dice panel.
  """
  records = read_metrics_jsonl(metrics_jsonl_path)
  loss_steps, losses = _series(records, loss_key)
  if not len(losses):
    raise ValueError(f'{metrics_jsonl_path}: no "{loss_key}" entries to plot')
  dice_steps, dices = _series(records, dice_key)

  fig = _figure(10, 4)
  loss_ax, dice_ax = fig.subplots(1, 2)
  loss_ax.plot(loss_steps, losses, color='C0', alpha=0.3, linewidth=1, label='per logged step')
  loss_ax.plot(loss_steps, ema(losses, smoothing), color='C0', linewidth=2,
               label=f'smoothed (EMA {smoothing:g})')
  loss_ax.set(xlabel='step', ylabel='loss', title='training loss')
  loss_ax.legend()
  if len(dices):
    best = int(np.argmax(dices))
    dice_ax.plot(dice_steps, dices, color='C1', marker='o', markersize=3, label='validation Dice')
    dice_ax.plot(dice_steps[best], dices[best], color='C3', marker='*', markersize=12,
                 linestyle='none', label=f'best {dices[best]:.4f} at step {dice_steps[best]}')
    dice_ax.legend()
  else:
    dice_ax.text(0.5, 0.5, 'no validation yet', ha='center', va='center',
                 transform=dice_ax.transAxes)
  dice_ax.set(xlabel='step', ylabel='Dice', title='validation Dice (pooled, eq. 16)')
  _set_titles(fig, title, subtitle)
  return _save(fig, out_png)


# --- Overlays -------------------------------------------------------------------------------------

def _check_slices(image: np.ndarray, *masks: np.ndarray) -> None:
  if image.ndim != 2 or any(m.shape != image.shape for m in masks):
    raise ValueError('image and masks must be 2D of one shape, got '
                     + ', '.join(str(a.shape) for a in (image, *masks)))


def _draw_contour(ax, mask: np.ndarray, color: str) -> None:
  """The mask's boundary: the 0.5 level line, halfway between foreground and background pixels."""
  if mask.any() and not mask.all():
    ax.contour(mask.astype(np.float32), levels=[0.5], colors=[color], linewidths=1.5)


def _draw_overlay(ax, image, label, pred) -> None:
  image = np.asarray(image)
  label, pred = np.asarray(label).astype(bool), np.asarray(pred).astype(bool)
  _check_slices(image, label, pred)
  ax.imshow(image, cmap='gray', interpolation='nearest')
  _draw_contour(ax, label, LABEL_COLOR)
  _draw_contour(ax, pred, PRED_COLOR)
  ax.set_axis_off()


def _contour_legend() -> list[Line2D]:
  return [Line2D([], [], color=LABEL_COLOR, linewidth=2, label='ground truth'),
          Line2D([], [], color=PRED_COLOR, linewidth=2, label='prediction')]


def overlay_grid(images, labels, preds, out_png, panel_titles: Sequence[str], title: str, *,
                 subtitle: str | None = None, columns: int = 4) -> pathlib.Path:
  """Slices in grey with the ground-truth and predicted contours, `columns` per row; 300 pixels per column, 330 per row + 80."""
  if not len(images) == len(labels) == len(preds) == len(panel_titles) > 0:
    raise ValueError(f'need as many images, labels, preds and panel_titles (at least one), got '
                     f'{len(images)}, {len(labels)}, {len(preds)}, {len(panel_titles)}')
  columns = min(columns, len(images))
  rows = math.ceil(len(images) / columns)
  fig = _figure(3 * columns, 3.3 * rows + 0.8)
  axes = np.atleast_1d(fig.subplots(rows, columns)).ravel()
  for ax, image, label, pred, panel_title in zip(axes, images, labels, preds, panel_titles):
    _draw_overlay(ax, image, label, pred)
    ax.set_title(panel_title)
  for ax in axes[len(images):]:
    ax.set_axis_off()
  fig.legend(handles=_contour_legend(), loc='outside lower center', ncol=2, frameon=False)
  _set_titles(fig, title, subtitle)
  return _save(fig, out_png)


def best_and_worst_slices(slice_counts, count: int) -> tuple[np.ndarray, np.ndarray]:
  """Indices of the `count` best (best first) and worst (worst first) slices by Dice, eq. (16).

  Only slices with ground-truth foreground compete (as in `metrics.foreground_slice_summary`).
  Ties keep slice order; the two sets never overlap (with fewer than 2 * count candidates, the
  worst are the ones left after the best).
  """
  counts = np.asarray(slice_counts, np.int64).reshape(-1, len(metrics.COUNT_FIELDS))
  candidates = np.flatnonzero(counts[:, 0] + counts[:, 2] > 0)
  ranked = candidates[np.argsort(-metrics.dice(counts[candidates]), kind='stable')]
  best = ranked[:count]
  return best, ranked[len(best):][::-1][:count]


# --- Attention maps (the paper's attention figure, Section IV-F) ----------------------------------

def _linear_taps(size_in: int, size_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Source indices and weight of the upper one for linear resizing with half-pixel centres."""
  source = np.clip((np.arange(size_out) + 0.5) * (size_in / size_out) - 0.5, 0, size_in - 1)
  lower = np.floor(source).astype(np.int64)
  return lower, np.minimum(lower + 1, size_in - 1), source - lower


def bilinear_resize(x, shape: tuple[int, int]) -> np.ndarray:
  """Bilinear resize of a 2D array, half-pixel centres, edges clamped (as `jax.image.resize`)."""
  x = np.asarray(x, np.float64)
  row_lo, row_hi, row_w = _linear_taps(x.shape[0], shape[0])
  col_lo, col_hi, col_w = _linear_taps(x.shape[1], shape[1])
  rows = x[row_lo] * (1 - row_w)[:, None] + x[row_hi] * row_w[:, None]
  return rows[:, col_lo] * (1 - col_w) + rows[:, col_hi] * col_w


def activation_heatmap(activation, shape: tuple[int, int]) -> np.ndarray:
  """Activation (h, w) or (h, w, C) -> (H, W) heat map in [0, 1].

  A (h, w, C) feature map (e.g. the CoA output F_A of eq. 4) is reduced to the channel mean of its
  absolute value; the map is upsampled bilinearly to `shape` and min-max normalised (a constant map
  gives zeros).
  """
  a = np.asarray(activation, np.float64)
  if a.ndim == 3:
    a = np.abs(a).mean(axis=-1)
  elif a.ndim != 2:
    raise ValueError(f'activation must be (h, w) or (h, w, C), got shape {a.shape}')
  heat = bilinear_resize(a, shape)
  low, high = heat.min(), heat.max()
  return (heat - low) / (high - low) if high > low else np.zeros(shape)


def attention_map(image, activation, out_png, title: str, *, label=None,
                  subtitle: str | None = None) -> pathlib.Path:
  """The slice (H, W) in grey under its `activation_heatmap` (blue low, red high), as in Fig. 6.

  `label` (H, W), if given, adds the ground-truth contour. 700 x 620 pixels.
  """
  image = np.asarray(image)
  masks = () if label is None else (np.asarray(label).astype(bool),)
  _check_slices(image, *masks)
  fig = _figure(7, 6.2)
  ax = fig.subplots()
  ax.imshow(image, cmap='gray', interpolation='nearest')
  heat = ax.imshow(activation_heatmap(activation, image.shape), cmap=HEATMAP_CMAP, alpha=0.45,
                   vmin=0.0, vmax=1.0, interpolation='nearest')
  fig.colorbar(heat, ax=ax, shrink=0.8, label='normalised activation')
  if masks:
    _draw_contour(ax, masks[0], LABEL_COLOR)
    ax.legend(handles=_contour_legend()[:1], loc='upper center', bbox_to_anchor=(0.5, 0.0),
              frameon=False)
  ax.set_axis_off()
  _set_titles(fig, title, subtitle)
  return _save(fig, out_png)
