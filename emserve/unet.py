"""One UNet for both jobs of the study: the DDPM denoiser and the segmentation network ("same architecture").

Shape: a ResNet UNet in the DDPM / guided-diffusion tradition. Every ResNet block is GroupNorm -> SiLU -> conv,
then GroupNorm with a scale-shift taken from one conditioning vector, SiLU, dropout, conv, plus a residual.
Multi-head self-attention runs at the lowest resolution(s) and in the middle. Downsampling is a strided conv,
upsampling nearest-neighbour + conv, and skip connections concatenate.

The conditioning vector is the sum of whichever embeddings are enabled:

- time: sinusoidal embedding of `t` (schedule steps, fractional allowed) -> MLP. `timestep=False` turns it off
  (the segmentation network).
- classes [B, K]: +1 present, -1 absent, 0 unknown. A row of zeros is the null ("no class condition") and maps to
  a learned null vector instead of the MLP output, so "nothing said" is not forced to look like "bias only".
- dataset [B] int64 in [0, num_datasets); -1 is the null and picks a learned extra row of the embedding table.

The spatial label map [B, L, H, W] (+1 present, -1 absent, 0 not given) is concatenated to the input channels.
A sample whose whole map is zero is the null; its map is replaced by a learned per-channel constant (broadcast over
H, W), so the network can tell "no map at all" from any real map.

With no conditioning at all (a plain segmentation network) the blocks carry no scale-shift layers.

Nulls are chosen with `torch.where`, never with Python branches on tensor values, so the module traces with
`torch.jit.trace` and exports with `torch.onnx.export(dynamo=True)` with dynamic batch and spatial size. Input
checks that read tensor values run only in eager mode. GroupNorm (no BatchNorm) keeps samples independent: the
output for one sample does not depend on the rest of the batch, which the "same seed, same sample whatever the
batch size" promise needs.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class UNetConfig:
    """Everything needed to rebuild a UNet; stored as JSON in checkpoints and model cards.

    `attention_levels` index `multipliers` (0 = full resolution); None means the lowest level only.
    """

    in_channels: int
    out_channels: int
    width: int = 64
    multipliers: tuple[int, ...] = (1, 2, 4, 8)
    blocks_per_level: int = 2
    attention_levels: tuple[int, ...] | None = None
    dropout: float = 0.0
    timestep: bool = True
    num_classes: int = 0
    num_datasets: int = 0
    label_channels: int = 0
    attention_head_dim: int = 32

    def __post_init__(self) -> None:
        # Coerce JSON lists back to tuples so configs compare equal after a round trip.
        object.__setattr__(self, "multipliers", tuple(int(m) for m in self.multipliers))
        levels = len(self.multipliers)
        attention = (levels - 1,) if self.attention_levels is None else tuple(int(a) for a in self.attention_levels)
        object.__setattr__(self, "attention_levels", attention)
        for name in ("in_channels", "out_channels", "width", "blocks_per_level", "attention_head_dim"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name}: must be a positive integer, got {getattr(self, name)!r}")
        for name in ("num_classes", "num_datasets", "label_channels"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)!r}")
        if levels == 0 or any(m < 1 for m in self.multipliers):
            raise ValueError(f"multipliers: must be a non-empty list of positive integers, got {self.multipliers}")
        if any(not 0 <= a < levels for a in attention):
            raise ValueError(f"attention_levels: each must be in [0, {levels}) (indices into multipliers), "
                             f"got {attention}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout: must be in [0, 1), got {self.dropout}")

    @property
    def size_factor(self) -> int:
        """Height and width must be multiples of this (one halving per level below the first)."""
        return 2 ** (len(self.multipliers) - 1)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["multipliers"] = list(self.multipliers)
        data["attention_levels"] = list(self.attention_levels or ())
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UNetConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unet config: unknown keys {unknown}; allowed: {sorted(known)}")
        return cls(**data)


def _groups(channels: int) -> int:
    """GroupNorm groups: 32 where possible, fewer for the tiny widths tests use."""
    return math.gcd(32, channels)


def timestep_frequencies(dim: int, max_period: float = 10000.0) -> Tensor:
    """The frequencies of the sinusoidal timestep features (kept as a buffer, so a traced graph follows the
    module's device instead of baking in the device it was traced on)."""
    half = dim // 2
    return torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)


def timestep_embedding(t: Tensor, freqs: Tensor) -> Tensor:
    """Sinusoidal features of (possibly fractional) timesteps [B] -> [B, 2 * len(freqs)], in float32."""
    args = t.float()[:, None] * freqs[None, :]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice with a residual; the conditioning vector scales and shifts the second norm."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(in_ch), in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, 2 * out_ch) if emb_dim > 0 else None
        self.norm2 = nn.GroupNorm(_groups(out_ch), out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor | None) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.norm2(h)
        if self.emb_proj is not None and emb is not None:
            scale, shift = self.emb_proj(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
            h = h * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return h + self.skip(x)


class Attention(nn.Module):
    """Multi-head self-attention over all pixels, with a residual; used where the maps are small."""

    def __init__(self, channels: int, head_dim: int) -> None:
        super().__init__()
        self.heads = channels // head_dim if channels % head_dim == 0 else 1
        self.norm = nn.GroupNorm(_groups(channels), channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c = x.shape[0], x.shape[1]
        # contiguous: the fused attention kernels (CPU flash, CUDA flash / memory-efficient) need the last dim at
        # stride 1; the transposed view falls back to the unfused math kernel, ~4x slower on CPU at 16x16
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, -1).transpose(-1, -2).contiguous()
        out = F.scaled_dot_product_attention(qkv[:, 0], qkv[:, 1], qkv[:, 2])  # [B, heads, HW, head_dim]
        return x + self.proj(out.transpose(-1, -2).reshape(x.shape))


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest + conv rather than a transposed conv: no checkerboard artefacts."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """The ResNet blocks (and attention) of one resolution on one side of the U."""

    def __init__(self, channels: list[tuple[int, int]], emb_dim: int, dropout: float, attention: bool,
                 head_dim: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(ResBlock(i, o, emb_dim, dropout) for i, o in channels)
        self.attns = nn.ModuleList(Attention(o, head_dim) if attention else nn.Identity() for _, o in channels)


def _eager() -> bool:
    """True unless tracing or exporting: value checks (which read tensors) run only then."""
    return not (torch.jit.is_tracing() or torch.compiler.is_compiling() or torch.compiler.is_exporting())


class UNet(nn.Module):
    """The denoiser (timestep=True) or the segmentation network (timestep=False); see the module docstring."""

    def __init__(self, in_channels: int, out_channels: int, width: int = 64,
                 multipliers: tuple[int, ...] = (1, 2, 4, 8), blocks_per_level: int = 2,
                 attention_levels: tuple[int, ...] | None = None, dropout: float = 0.0, timestep: bool = True,
                 num_classes: int = 0, num_datasets: int = 0, label_channels: int = 0,
                 attention_head_dim: int = 32) -> None:
        super().__init__()
        cfg = UNetConfig(in_channels, out_channels, width, tuple(multipliers), blocks_per_level, attention_levels,
                         dropout, timestep, num_classes, num_datasets, label_channels, attention_head_dim)
        self.config = cfg
        emb_dim = 4 * width if (timestep or num_classes or num_datasets) else 0

        # Conditioning embeddings, all of size emb_dim, summed in forward.
        self.register_buffer("freqs", timestep_frequencies(2 * (width // 2)), persistent=False)
        self.time_mlp = (nn.Sequential(nn.Linear(2 * (width // 2), emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
                         if timestep else None)
        self.class_mlp = (nn.Sequential(nn.Linear(num_classes, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
                          if num_classes else None)
        self.null_classes = nn.Parameter(0.02 * torch.randn(emb_dim)) if num_classes else None
        self.dataset_emb = nn.Embedding(num_datasets + 1, emb_dim) if num_datasets else None  # last row: null
        self.null_label_map = nn.Parameter(torch.zeros(label_channels)) if label_channels else None

        # The U. Skips: the stem, every down block and every downsample; each up block takes one back.
        self.stem = nn.Conv2d(in_channels + label_channels, width, 3, padding=1)
        chans = [width * m for m in cfg.multipliers]
        skips = [width]
        ch = width
        self.down, self.downsample = nn.ModuleList(), nn.ModuleList()
        for level, out in enumerate(chans):
            pairs = [(ch if i == 0 else out, out) for i in range(blocks_per_level)]
            self.down.append(Level(pairs, emb_dim, dropout, level in cfg.attention_levels, attention_head_dim))
            ch = out
            skips += [out] * blocks_per_level
            last = level == len(chans) - 1
            self.downsample.append(nn.Identity() if last else Downsample(ch))
            if not last:
                skips.append(ch)

        self.mid1 = ResBlock(ch, ch, emb_dim, dropout)
        self.mid_attn = Attention(ch, attention_head_dim)
        self.mid2 = ResBlock(ch, ch, emb_dim, dropout)

        self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
        for level in reversed(range(len(chans))):
            out = chans[level]
            pairs = []
            for _ in range(blocks_per_level + 1):
                pairs.append((ch + skips.pop(), out))
                ch = out
            self.up.append(Level(pairs, emb_dim, dropout, level in cfg.attention_levels, attention_head_dim))
            self.upsample.append(Upsample(ch) if level > 0 else nn.Identity())
        assert not skips, "every skip connection must be consumed"

        self.head = nn.Sequential(nn.GroupNorm(_groups(ch), ch), nn.SiLU(), nn.Conv2d(ch, out_channels, 3, padding=1))
        # Zero output at init: the DDPM starts by predicting "no noise", the segmenter with logits 0.
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)

    @classmethod
    def from_config(cls, config: UNetConfig | dict[str, Any]) -> UNet:
        if isinstance(config, dict):
            config = UNetConfig.from_dict(config)
        return cls(**{f.name: getattr(config, f.name) for f in fields(UNetConfig)})

    # ---- inputs ---------------------------------------------------------------------------------------------

    def _check_none(self, t: Tensor | None, classes: Tensor | None, dataset: Tensor | None,
                    label_map: Tensor | None) -> None:
        """Refuse conditions the config does not have (structural; safe under tracing)."""
        cfg = self.config
        if cfg.timestep and t is None:
            raise ValueError("t: this UNet is a denoiser (timestep=True) and needs t [B]")
        given = {"t": (t, cfg.timestep, "timestep=False"), "classes": (classes, cfg.num_classes, "num_classes=0"),
                 "dataset": (dataset, cfg.num_datasets, "num_datasets=0"),
                 "label_map": (label_map, cfg.label_channels, "label_channels=0")}
        for name, (value, enabled, why) in given.items():
            if value is not None and not enabled:
                raise ValueError(f"{name}: this UNet has no {name} input ({why}); pass None")

    def _check_values(self, x: Tensor, t: Tensor | None, classes: Tensor | None, dataset: Tensor | None,
                      label_map: Tensor | None) -> None:
        """Shapes, sizes and dataset ids, with messages naming the field. Eager mode only."""
        cfg = self.config
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"x: expected [B, {cfg.in_channels}, H, W], got {list(x.shape)}")
        b, _, h, w = x.shape
        f = cfg.size_factor
        if h % f or w % f:
            raise ValueError(f"x: spatial size {h}x{w} is not divisible by {f} (2**(levels-1) for "
                             f"{len(cfg.multipliers)} levels)")
        expected = {"t": (t, (b,)), "classes": (classes, (b, cfg.num_classes)), "dataset": (dataset, (b,)),
                    "label_map": (label_map, (b, cfg.label_channels, h, w))}
        for name, (value, shape) in expected.items():
            if value is not None and tuple(value.shape) != shape:
                raise ValueError(f"{name}: expected shape {list(shape)}, got {list(value.shape)}")
        if dataset is not None:
            if dataset.is_floating_point():
                raise ValueError(f"dataset: expected integer ids (int64), got {dataset.dtype}")
            if dataset.numel() and bool(((dataset < -1) | (dataset >= cfg.num_datasets)).any()):
                raise ValueError(f"dataset: ids must be in [-1, {cfg.num_datasets}) (-1 = null), "
                                 f"got {dataset.tolist()}")

    def embedding(self, x: Tensor, t: Tensor | None, classes: Tensor | None, dataset: Tensor | None) -> Tensor | None:
        """Sum of the enabled condition embeddings [B, emb]; None when the UNet has no conditioning."""
        b = x.shape[0]
        parts: list[Tensor] = []
        if self.time_mlp is not None and t is not None:
            parts.append(self.time_mlp(timestep_embedding(t, self.freqs).to(x.dtype)))
        if self.class_mlp is not None and self.null_classes is not None:
            classes = x.new_zeros(b, self.config.num_classes) if classes is None else classes.to(x.dtype)
            is_null = (classes == 0).all(dim=1, keepdim=True)
            parts.append(torch.where(is_null, self.null_classes.to(x.dtype), self.class_mlp(classes)))
        if self.dataset_emb is not None:
            n = self.config.num_datasets
            dataset = torch.full((b,), -1, dtype=torch.long, device=x.device) if dataset is None else dataset.long()
            parts.append(self.dataset_emb(torch.where(dataset < 0, n, dataset)).to(x.dtype))
        if not parts:
            return None
        emb = parts[0]
        for part in parts[1:]:
            emb = emb + part
        return emb

    def _with_label_map(self, x: Tensor, label_map: Tensor | None) -> Tensor:
        """Concatenate the label map, swapping each all-zero (null) map for the learned constant map."""
        if self.null_label_map is None:
            return x
        null = self.null_label_map.to(x.dtype)[None, :, None, None]
        if label_map is None:
            label_map = null.expand(x.shape[0], -1, x.shape[2], x.shape[3])
        else:
            label_map = label_map.to(x.dtype)
            is_null = (label_map == 0).flatten(1).all(dim=1)[:, None, None, None]
            label_map = torch.where(is_null, null, label_map)
        return torch.cat([x, label_map], dim=1)

    # ---- forward --------------------------------------------------------------------------------------------

    def forward(self, x: Tensor, t: Tensor | None = None, classes: Tensor | None = None,
                dataset: Tensor | None = None, label_map: Tensor | None = None) -> Tensor:
        """x [B,C,H,W], t [B] (steps), classes [B,K], dataset [B] int64, label_map [B,L,H,W] -> [B,out,H,W].

        An enabled condition given as None is the null for the whole batch; a disabled one given raises.
        """
        self._check_none(t, classes, dataset, label_map)
        if _eager():
            self._check_values(x, t, classes, dataset, label_map)
        emb = self.embedding(x, t, classes, dataset)

        h = self.stem(self._with_label_map(x, label_map))
        skips = [h]
        for level, down in zip(self.down, self.downsample, strict=True):
            for block, attn in zip(level.blocks, level.attns, strict=True):
                h = attn(block(h, emb))
                skips.append(h)
            if not isinstance(down, nn.Identity):
                h = down(h)
                skips.append(h)

        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)

        for level, up in zip(self.up, self.upsample, strict=True):
            for block, attn in zip(level.blocks, level.attns, strict=True):
                h = attn(block(torch.cat([h, skips.pop()], dim=1), emb))
            h = up(h)
        return self.head(h)

    # ---- export helpers -------------------------------------------------------------------------------------

    def example_inputs(self, batch: int = 2, height: int | None = None, width: int | None = None,
                       ) -> dict[str, Tensor]:
        """Random inputs for the enabled arguments only (the graph's named inputs), for tracing and export.

        Defaults to 2 * size_factor pixels so no spatial dimension is 1 anywhere (that would specialise export).
        """
        cfg = self.config
        height = height or 2 * cfg.size_factor
        width = width or height
        device = next(self.parameters()).device
        inputs = {"x": torch.randn(batch, cfg.in_channels, height, width, device=device)}
        if cfg.timestep:
            inputs["t"] = torch.rand(batch, device=device) * 999
        if cfg.num_classes:
            inputs["classes"] = torch.randint(-1, 2, (batch, cfg.num_classes), device=device).float()
        if cfg.num_datasets:
            inputs["dataset"] = torch.randint(-1, cfg.num_datasets, (batch,), device=device)
        if cfg.label_channels:
            inputs["label_map"] = torch.randint(-1, 2, (batch, cfg.label_channels, height, width),
                                                device=device).float()
        return inputs

    def dynamic_shapes(self, inputs: dict[str, Tensor]) -> dict[str, dict[int, Any]]:
        """`dynamic_shapes` for torch.export / torch.onnx.export(dynamo=True): dynamic batch, and H, W as
        multiples of size_factor (the exporter needs to know the divisibility, or it specialises)."""
        from torch.export import Dim

        f = self.config.size_factor
        batch, h, w = Dim("batch"), Dim("h"), Dim("w")
        height, width = (h, w) if f == 1 else (f * h, f * w)
        spatial = {0: batch, 2: height, 3: width}
        shapes = {"x": spatial, "t": {0: batch}, "classes": {0: batch}, "dataset": {0: batch}, "label_map": spatial}
        return {name: shapes[name] for name in inputs}


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def dropout_conditions(classes: Tensor | None, dataset: Tensor | None, label_map: Tensor | None,
                       p_classes: float, p_dataset: float, p_label_map: float,
                       generator: torch.Generator | None = None, *, p_class_entry: float = 0.0,
                       ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Replace each condition by its null independently per sample (classifier-free guidance training).

    classes rows become 0, dataset ids -1, label maps all 0, each with its own probability. `p_class_entry`
    additionally sets single entries of `classes` to 0 ("unknown"), so partial class conditions are learned
    (a row that loses every entry is then the null, as the convention says). None stays None. Inputs are not
    modified. Random numbers are drawn for every given condition whatever the probabilities, so the same
    generator state gives the same masks when only a probability changes.
    """
    for name, p in (("p_classes", p_classes), ("p_dataset", p_dataset), ("p_label_map", p_label_map),
                    ("p_class_entry", p_class_entry)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{name}: must be in [0, 1], got {p}")
    given = [c for c in (classes, dataset, label_map) if c is not None]
    if not given:
        return classes, dataset, label_map
    batch = given[0].shape[0]
    if any(c.shape[0] != batch for c in given):
        raise ValueError(f"conditions: batch sizes differ: {[c.shape[0] for c in given]}")

    def draw(*shape: int) -> Tensor:
        device = generator.device if generator is not None else given[0].device
        return torch.rand(*shape, generator=generator, device=device).to(given[0].device)

    if classes is not None:
        entry_kept = draw(*classes.shape) >= p_class_entry
        row_kept = draw(batch)[:, None] >= p_classes
        classes = torch.where(entry_kept & row_kept, classes, torch.zeros_like(classes))
    if dataset is not None:
        dataset = torch.where(draw(batch) >= p_dataset, dataset, torch.full_like(dataset, -1))
    if label_map is not None:
        kept = (draw(batch) >= p_label_map).reshape(-1, *([1] * (label_map.ndim - 1)))
        label_map = torch.where(kept, label_map, torch.zeros_like(label_map))
    return classes, dataset, label_map
