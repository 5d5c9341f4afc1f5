"""The LTDiff++ networks: a UNet++ autoencoder with a compact latent, and the conditional latent denoiser.

Layout (all shapes are (batch, channels, y, x); an image slice is 1 channel of normalized HU)::

    image (1, H, W) --pixel-unshuffle x p--> (p², H/p, W/p) --UNet++ encoder--> z (C_z, H/p, W/p)
    z --UNet++ decoder (deep supervision heads on X^{0,1..L})--> L images (p², H/p, W/p) --pixel-shuffle--> (1, H, W)

The nested dense skip pathways of UNet++ (Zhou et al. 2018) live *inside* the encoder and *inside* the
decoder; nothing crosses from encoder to decoder except z. This avoids the "bypass trap" of a plain
UNet++ (full-resolution skips would carry the source kernel's texture straight to the output, so a
diffusion model that edits only the bottleneck could not change it): here ``LTDiffPPNet.decode`` takes
z and nothing else, and ``tests/test_models.py`` checks that replacing z changes every output scale.

The denoiser is a small conditional UNet on the latent grid: it sees the noisy target latent z_t
concatenated with the *source* latent (the condition) and the diffusion time t ∈ [0, 1], and predicts
v (or x0; see :mod:`LTDiffPPLib.sampler`).

**Kernel prior** (``ModelConfig.kernel_prior``): both reconstructions of a scan come from the same raw
data, so most of the sharp kernel's image — its grain included — is a *linear* filtering of the smooth
one: a radial gain G(f) in frequency space (f in mm⁻¹), fitted on the training pairs and stored in the
model file. With the prior, the source is first filtered by G (:class:`KernelPrior`, physical
frequencies, so it follows the input's pixel size), the denoiser is conditioned on the latent c of the
filtered image p, and the diffusion model generates only the *residual* latent Δ (standardized by its
per-channel std): output = p + D(c + Δ) − D(c). With Δ = 0 the output is exactly the filtered source
(the autoencoder's reconstruction error cancels), so training starts from the physics baseline and
learns what a linear filter cannot do.

**Variants** (``ModelConfig.variant``): the same classes also build the paper's comparison models, so
that one package trains and runs them all:

- ``"ltdiff++"`` (default): everything above.
- ``"unet++"``: the UNet++ autoencoder alone as a direct translator, image = D(E(source)), trained on
  pairs; no denoiser, no sampling (:attr:`ModelConfig.has_diffusion` is False).
- ``"pixel-ddpm"``: a conditional DDPM in pixel space: the denoiser works on the pixel-unshuffled image
  (patch² channels at H/patch × W/patch, so ``latent_channels`` must be patch²) conditioned on the
  unshuffled source; the "autoencoder" is the parameter-free :class:`PixelShuffleCodec`.
- ``"single-scale-ldm"`` (DiffusionCT-like): the latent diffusion of LTDiff++ over a plain U-Net
  encoder and decoder: backbone column and one decoder column, no nested dense skip nodes, one output
  (no deep supervision).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .kernels import PAIR_GAIN_FLOOR, PAIR_GAIN_MAX

__all__ = ["Conditioning", "KernelPrior", "ModelConfig", "LTDiffPPNet", "NestedUNet", "UNetPPAutoencoder",
           "LatentDenoiser", "PixelShuffleCodec", "VARIANTS"]

#: model variants (see the module docstring): LTDiff++ and the paper's comparison models
VARIANTS = ("ltdiff++", "unet++", "pixel-ddpm", "single-scale-ldm")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of an LTDiff++ model; stored in every model file's metadata.

    The defaults are the shipped model's architecture (2.3 M parameters, sized to train on a CPU and
    convert a 512² slice in about a second there) except ``kernel_prior``, which is off by default so
    that configurations written before it existed keep their meaning (the shipped model turns it on);
    ``Training/configs/large.json`` holds a wider one for GPUs.

    ``patch``: pixel-unshuffle factor between the image and the latent grid (latent is H/patch × W/patch).
    ``ae_widths``: channels of the UNet++ levels (one level per entry, each half the previous resolution).
    ``latent_channels``: channels of z.
    ``ae_linear_path``: a 1×1-convolution shortcut *inside* the encoder (pixels → z) and *inside* the
    decoder (z → pixels), added to the UNet++ output, so that an invertible latent is learned in few
    steps (nothing crosses from encoder to decoder but z).
    ``den_widths``: channels of the denoiser UNet levels; ``den_blocks``: residual blocks per level.
    ``den_attention``: self-attention at the denoiser's coarsest level.
    ``prediction``: what the denoiser predicts, ``"v"`` or ``"x0"``.
    ``schedule``: noise schedule name (see :mod:`LTDiffPPLib.sampler`).
    ``kernel_prior``: convert as the residual over a fitted linear kernel filter (module docstring);
    only for the latent-diffusion variants.
    ``kernel_conditioned``: one model for every pair of library kernels (needs ``kernel_prior``): the
    prior is the library's G = W_target / W_source of the pair (:func:`LTDiffPPLib.kernels.pair_gain`)
    and the denoiser is conditioned on the pair's code (:func:`pair_code`); set the pair with
    :meth:`LTDiffPPNet.set_pair` before converting.
    ``variant``: one of :data:`VARIANTS` (module docstring); absent from a stored dict means
    ``"ltdiff++"``. Fields a variant does not use are kept but ignored (``den_*`` for ``"unet++"``,
    ``ae_*`` for ``"pixel-ddpm"``).
    """

    patch: int = 4
    ae_widths: tuple[int, ...] = (32, 48, 64)
    latent_channels: int = 16
    ae_linear_path: bool = True
    den_widths: tuple[int, ...] = (48, 96, 96)
    den_blocks: int = 1
    den_attention: bool = False
    time_dim: int = 64
    groups: int = 8
    prediction: str = "v"
    schedule: str = "cosine"
    kernel_prior: bool = False
    variant: str = "ltdiff++"
    kernel_conditioned: bool = False

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, not {self.variant!r}")
        if self.prediction not in ("v", "x0"):
            raise ValueError(f"prediction must be 'v' or 'x0', not {self.prediction!r}")
        if self.kernel_prior and not self.latent_diffusion:
            raise ValueError(f"kernel_prior needs a latent diffusion model ('ltdiff++' or 'single-scale-ldm'), "
                             f"not variant {self.variant!r}")
        if self.kernel_conditioned and not self.kernel_prior:
            raise ValueError("kernel_conditioned needs kernel_prior (the pair's library gain is its prior)")
        if not self.has_autoencoder and self.latent_channels != self.patch**2:
            raise ValueError(f"variant 'pixel-ddpm' diffuses the pixel-unshuffled image: latent_channels must be "
                             f"patch² = {self.patch**2}, not {self.latent_channels}")
        for w in (*self.ae_widths, *self.den_widths):
            if w % self.groups:
                raise ValueError(f"every width must be divisible by groups={self.groups}; got {w}")
        if len(self.ae_widths) < 2 or len(self.den_widths) < 1:
            raise ValueError("ae_widths needs >= 2 levels and den_widths >= 1")

    @property
    def has_autoencoder(self) -> bool:
        """Whether the model has a learned autoencoder (all variants but ``"pixel-ddpm"``)."""
        return self.variant != "pixel-ddpm"

    @property
    def has_diffusion(self) -> bool:
        """Whether the model generates by reverse diffusion (all variants but ``"unet++"``)."""
        return self.variant != "unet++"

    @property
    def latent_diffusion(self) -> bool:
        """Diffusion in a learned latent, whose channel statistics are measured after phase 1."""
        return self.has_autoencoder and self.has_diffusion

    @property
    def spatial_multiple(self) -> int:
        """Image height and width must be multiples of this (pixel-unshuffle times all downsamplings)."""
        levels = [len(self.ae_widths) - 1] if self.has_autoencoder else []
        levels += [len(self.den_widths) - 1] if self.has_diffusion else []
        return self.patch * 2 ** max(levels)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**kw)


# ---------------------------------------------------------------------------------------- kernel pair

#: frequencies (mm⁻¹) at which a kernel pair is described to a kernel-conditioned denoiser
PAIR_FREQUENCIES_MM = tuple(float(f) for f in np.linspace(0.05, 0.8, 16))
PAIR_CODE_SIZE = 2 * len(PAIR_FREQUENCIES_MM)
_LOG_CLIP = 4.0


def pair_code(source: Any, target: Any) -> np.ndarray:
    """The description of a kernel pair a kernel-conditioned denoiser sees (float32, PAIR_CODE_SIZE,):
    log G = log(W_target / W_source) (regularized, :func:`LTDiffPPLib.kernels.pair_gain`) and log W_target
    at :data:`PAIR_FREQUENCIES_MM`, each clipped to ±4. ``source`` / ``target``: library names or kernels."""
    from .kernels import get_kernel, pair_gain

    ks, kt = get_kernel(source), get_kernel(target)
    f = np.asarray(PAIR_FREQUENCIES_MM)
    log_g = np.log(pair_gain(ks, kt, f))
    log_wt = np.log(np.maximum(kt.window(f), np.exp(-_LOG_CLIP)))
    return np.clip(np.concatenate([log_g, log_wt]), -_LOG_CLIP, _LOG_CLIP).astype(np.float32)


# --------------------------------------------------------------------------------------------- blocks


class ResBlock(nn.Module):
    """GroupNorm–SiLU–conv3×3 twice, with a residual connection; optional FiLM from a time embedding."""

    def __init__(self, cin: int, cout: int, groups: int, time_dim: int | None = None) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(cin, groups), cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(_groups(cout, groups), cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
        self.film = nn.Linear(time_dim, 2 * cout) if time_dim else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.norm2(h)
        if self.film is not None:
            scale, shift = self.film(temb)[:, :, None, None].chunk(2, dim=1)
            h = h * (1 + scale) + shift
        h = self.conv2(F.silu(h))
        return self.skip(x) + h


def _groups(channels: int, groups: int) -> int:
    return math.gcd(channels, groups)


class NestedUNet(nn.Module):
    """UNet++: a backbone column X^{i,0} and nested dense skip nodes X^{i,j} (Zhou et al. 2018).

    X^{i,j} = Block([X^{i,0}, …, X^{i,j-1}, Up(X^{i+1,j-1})]). Heads on X^{0,1..L} (deep supervision)
    map to ``cout`` channels; ``forward`` returns them in order, the last (X^{0,L}) being the full output.
    Input (B, cin, h, w) with h, w divisible by 2^(L); outputs (B, cout, h, w).

    ``nested=False`` builds the plain U-Net inside the same frame: only the decoder column
    X^{i,L-i} = Block([X^{i,0}, Up(X^{i+1,L-i-1})]), no nested nodes, one head on X^{0,L} (so no deep
    supervision).
    """

    def __init__(self, cin: int, cout: int, widths: tuple[int, ...], groups: int, deep_supervision: bool,
                 nested: bool = True) -> None:
        super().__init__()
        if deep_supervision and not nested:
            raise ValueError("deep supervision needs the nested nodes X^{0,1..L-1}")
        self.levels = len(widths)
        self.nested = nested
        self.stem = nn.Conv2d(cin, widths[0], 3, padding=1)
        self.nodes = nn.ModuleDict()
        for i, w in enumerate(widths):
            self.nodes[f"{i}_0"] = ResBlock(widths[i - 1] if i else widths[0], w, groups)
        for i, j in self._inner_nodes():
            cin_ij = widths[i] * (j if nested else 1) + widths[i + 1]
            self.nodes[f"{i}_{j}"] = ResBlock(cin_ij, widths[i], groups)
        self.downs = nn.ModuleList(nn.Conv2d(widths[i], widths[i], 3, stride=2, padding=1) for i in range(self.levels - 1))
        head_idx = range(1, self.levels) if deep_supervision else [self.levels - 1]
        self.head_index = list(head_idx)
        self.heads = nn.ModuleList(
            nn.Sequential(nn.GroupNorm(_groups(widths[0], groups), widths[0]), nn.SiLU(), nn.Conv2d(widths[0], cout, 3, padding=1))
            for _ in self.head_index
        )

    def _inner_nodes(self) -> list[tuple[int, int]]:
        """(i, j), j ≥ 1, of the nodes after the backbone in computation order: all of them (UNet++) or
        the decoder column i + j = L (plain U-Net)."""
        last = self.levels - 1
        return [(i, j) for j in range(1, self.levels) for i in range(self.levels - j) if self.nested or i + j == last]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        X: dict[tuple[int, int], torch.Tensor] = {}
        h = self.stem(x)
        for i in range(self.levels):
            if i:
                h = self.downs[i - 1](h)
            h = self.nodes[f"{i}_0"](h)
            X[i, 0] = h
        for i, j in self._inner_nodes():
            up = F.interpolate(X[i + 1, j - 1], scale_factor=2.0, mode="nearest")
            skips = [X[i, k] for k in range(j)] if self.nested else [X[i, 0]]
            X[i, j] = self.nodes[f"{i}_{j}"](torch.cat([*skips, up], dim=1))
        return [head(X[0, j]) for head, j in zip(self.heads, self.head_index)]


class UNetPPAutoencoder(nn.Module):
    """Image ↔ compact latent. ``encode``: (B,1,H,W) → (B,C_z,H/p,W/p); ``decode``: z → list of (B,1,H,W).

    UNet++ encoder and decoder, or plain U-Nets with a single output for ``"single-scale-ldm"``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        p2 = cfg.patch**2
        self.patch = cfg.patch
        nested = cfg.variant != "single-scale-ldm"
        self.encoder = NestedUNet(p2, cfg.latent_channels, cfg.ae_widths, cfg.groups, deep_supervision=False,
                                  nested=nested)
        self.decoder = NestedUNet(cfg.latent_channels, p2, cfg.ae_widths, cfg.groups, deep_supervision=nested,
                                  nested=nested)
        self.enc_linear = nn.Conv2d(p2, cfg.latent_channels, 1) if cfg.ae_linear_path else None
        self.dec_linear = nn.Conv2d(cfg.latent_channels, p2, 1) if cfg.ae_linear_path else None

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pixel_unshuffle(x, self.patch)
        z = self.encoder(x)[-1]
        return z + self.enc_linear(x) if self.enc_linear is not None else z

    def decode(self, z: torch.Tensor) -> list[torch.Tensor]:
        """All deep-supervision outputs, coarsest nested path first; the last one is the full output."""
        outs = self.decoder(z)
        if self.dec_linear is not None:
            lin = self.dec_linear(z)
            outs = [o + lin for o in outs]
        return [F.pixel_shuffle(o, self.patch) for o in outs]

    def full_decoder_parameters(self) -> list[nn.Parameter]:
        """The decoder's parameters without its coarser deep-supervision heads (phase-1 aids)."""
        aux_heads = {id(p) for head in self.decoder.heads[:-1] for p in head.parameters()}
        return [p for p in self.decoder.parameters() if id(p) not in aux_heads]


class PixelShuffleCodec(nn.Module):
    """The parameter-free "autoencoder" of the pixel-space DDPM: ``encode`` pixel-unshuffles
    (B,1,H,W) → (B,p²,H/p,W/p), ``decode`` shuffles back and returns ``[image]`` (one output, as a list
    like :meth:`UNetPPAutoencoder.decode`). Lossless: decode(encode(x)) == x."""

    def __init__(self, patch: int) -> None:
        super().__init__()
        self.patch = patch

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return F.pixel_unshuffle(x, self.patch)

    def decode(self, z: torch.Tensor) -> list[torch.Tensor]:
        return [F.pixel_shuffle(z, self.patch)]

    def full_decoder_parameters(self) -> list[nn.Parameter]:
        return []


# ------------------------------------------------------------------------------------------- denoiser


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of continuous diffusion time t ∈ [0, 1], shape (B,) → (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = 1000.0 * t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class SelfAttention(nn.Module):
    def __init__(self, channels: int, groups: int, heads: int = 4) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(_groups(channels, groups), channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).transpose(-1, -2)
        # contiguous q, k, v let PyTorch pick its flash/memory-efficient kernel (also on the CPU); the
        # math fallback would materialize the (hw)² attention matrix: 43 GB for a 128² grid at batch 10
        q, k, v = (t.contiguous() for t in qkv.unbind(1))
        o = F.scaled_dot_product_attention(q, k, v)  # (b, heads, hw, c/heads)
        return x + self.proj(o.transpose(-1, -2).reshape(b, c, h, w))


class LatentDenoiser(nn.Module):
    """Conditional UNet on the latent grid: f(z_t, t, z_src) → prediction (v or x0), all (B, C_z, h, w)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        c, w, g, td = cfg.latent_channels, cfg.den_widths, cfg.groups, cfg.time_dim
        self.time_dim = td
        self.time_mlp = nn.Sequential(nn.Linear(td, td), nn.SiLU(), nn.Linear(td, td))
        # a kernel-conditioned model adds an embedding of the pair's code to the time embedding
        self.pair_mlp = (nn.Sequential(nn.Linear(PAIR_CODE_SIZE, td), nn.SiLU(), nn.Linear(td, td))
                         if cfg.kernel_conditioned else None)
        self.inp = nn.Conv2d(2 * c, w[0], 3, padding=1)
        self.down_blocks = nn.ModuleList()
        self.downsamples = nn.ModuleList()
        skips = []
        ch = w[0]
        for i, wi in enumerate(w):
            level = nn.ModuleList()
            for _ in range(cfg.den_blocks):
                level.append(ResBlock(ch, wi, g, td))
                ch = wi
                skips.append(ch)
            self.down_blocks.append(level)
            if i < len(w) - 1:
                self.downsamples.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
        self.mid1 = ResBlock(ch, ch, g, td)
        self.mid_attn = SelfAttention(ch, g) if cfg.den_attention else nn.Identity()
        self.mid2 = ResBlock(ch, ch, g, td)
        self.up_blocks = nn.ModuleList()
        self.upsamples = nn.ModuleList()
        for i, wi in reversed(list(enumerate(w))):
            level = nn.ModuleList()
            for _ in range(cfg.den_blocks):
                level.append(ResBlock(ch + skips.pop(), wi, g, td))
                ch = wi
            self.up_blocks.append(level)
            if i > 0:
                self.upsamples.append(nn.Conv2d(ch, w[i - 1], 3, padding=1))
                ch = w[i - 1]
        self.out = nn.Sequential(nn.GroupNorm(_groups(ch, g), ch), nn.SiLU(), nn.Conv2d(ch, c, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, z_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                pair: torch.Tensor | None = None) -> torch.Tensor:
        """``pair``: the kernel pair's code (1 or B, PAIR_CODE_SIZE) of a kernel-conditioned model."""
        temb = self.time_mlp(timestep_embedding(t, self.time_dim).to(z_t.dtype))
        if self.pair_mlp is not None:
            if pair is None:
                raise ValueError("a kernel-conditioned denoiser needs the kernel pair (LTDiffPPNet.set_pair)")
            temb = temb + self.pair_mlp(pair.to(temb.dtype)).expand_as(temb)
        h = self.inp(torch.cat([z_t, cond], dim=1))
        skips = []
        for i, level in enumerate(self.down_blocks):
            for block in level:
                h = block(h, temb)
                skips.append(h)
            if i < len(self.downsamples):
                h = self.downsamples[i](h)
        h = self.mid2(self.mid_attn(self.mid1(h, temb)), temb)
        for i, level in enumerate(self.up_blocks):
            for block in level:
                h = block(torch.cat([h, skips.pop()], dim=1), temb)
            if i < len(self.upsamples):
                h = self.upsamples[i](F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.out(h)


# -------------------------------------------------------------------------------------- kernel prior


class KernelPrior(nn.Module):
    """A fixed radial gain G(f) applied in 2-D frequency space: the linear part of a kernel conversion.

    G is tabulated at f = k · ``step`` mm⁻¹ (k = 0 … n−1; G(0) = 1 keeps the mean), linearly
    interpolated and held at its last value beyond the table. Identity (G ≡ 1) until
    :meth:`set_gain` is called; the table is stored in the model file's metadata, not as a weight.
    """

    def __init__(self, size: int = 201, step: float = 0.01) -> None:
        super().__init__()
        self.register_buffer("gain", torch.ones(size), persistent=False)
        self.step = float(step)

    def set_gain(self, gain: torch.Tensor | list[float], step: float) -> None:
        gain = torch.as_tensor(gain, dtype=torch.float32)
        if gain.ndim != 1 or gain.numel() < 2 or not torch.isfinite(gain).all() or not (gain > 0).all():
            raise ValueError("kernel prior gain must be a 1-D table of >= 2 positive finite values")
        if not step > 0:
            raise ValueError(f"kernel prior frequency step must be positive, got {step}")
        self.gain = gain.to(self.gain.device)
        self.step = float(step)

    def response(self, f: torch.Tensor) -> torch.Tensor:
        """G at frequencies ``f`` (mm⁻¹, any shape)."""
        pos = (f / self.step).clamp(min=0.0, max=self.gain.numel() - 1.0)
        i0 = pos.floor().clamp(max=self.gain.numel() - 2).long()
        w = pos - i0
        return self.gain[i0] * (1 - w) + self.gain[i0 + 1] * w

    def forward(self, x: torch.Tensor, pixel_mm: tuple[float, float], pad: int = 32) -> torch.Tensor:
        """Filter (B, 1, H, W) images with pixel size ``pixel_mm`` = (dy, dx) mm; float32 out.

        Reflection padding (``pad`` px) keeps the image edges from wrapping around."""
        dy, dx = (float(v) for v in pixel_mm)
        with torch.autocast(x.device.type, enabled=False):
            h, w = x.shape[-2:]
            pad = int(min(pad, h - 1, w - 1))
            xp = F.pad(x.float(), (pad, pad, pad, pad), mode="reflect") if pad > 0 else x.float()
            fy = torch.fft.fftfreq(xp.shape[-2], d=dy, device=x.device)[:, None]
            fx = torch.fft.rfftfreq(xp.shape[-1], d=dx, device=x.device)[None, :]
            spec = torch.fft.rfft2(xp) * self.response(torch.sqrt(fy**2 + fx**2))
            out = torch.fft.irfft2(spec, s=xp.shape[-2:])
            return out[..., pad:pad + h, pad:pad + w] if pad > 0 else out


class Conditioning(NamedTuple):
    """What a conversion is conditioned on: ``latent``, the standardized latent the denoiser sees
    (B, C_z, h, w); ``base``, with the kernel prior, the image the decoded residual is added to —
    the filtered source minus its own reconstruction (B, 1, H, W) — else None."""

    latent: torch.Tensor
    base: torch.Tensor | None


# ------------------------------------------------------------------------------------------ the model


class LTDiffPPNet(nn.Module):
    """UNet++ autoencoder + conditional latent denoiser, with latent channel statistics.

    ``encode`` returns the *standardized* latent ((z − mean) / std per channel), which is what the
    diffusion model works in; ``decode`` takes a standardized latent. The statistics are buffers here
    and are stored in the model file's metadata.

    The comparison variants (module docstring) keep this interface: ``"pixel-ddpm"`` has a
    :class:`PixelShuffleCodec` as ``autoencoder`` (its "latent" is the unshuffled image; statistics stay
    0 and 1), ``"unet++"`` has no ``denoiser`` (None): its conversion is ``render(condition(x).latent,
    cond)`` = D(E(x)), and the diffusion methods raise.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.autoencoder = UNetPPAutoencoder(cfg) if cfg.has_autoencoder else PixelShuffleCodec(cfg.patch)
        self.denoiser = LatentDenoiser(cfg) if cfg.has_diffusion else None
        self.register_buffer("latent_mean", torch.zeros(cfg.latent_channels), persistent=False)
        self.register_buffer("latent_std", torch.ones(cfg.latent_channels), persistent=False)
        self.register_buffer("residual_std", torch.ones(cfg.latent_channels), persistent=False)
        self.prior = KernelPrior() if cfg.kernel_prior else None
        self.register_buffer("pair_code", torch.zeros(1, PAIR_CODE_SIZE), persistent=False)
        self.pair: tuple[str, str] | None = None  # (source, target) set by set_pair (kernel-conditioned)
        #: regularization of a kernel-conditioned model's prior, :func:`LTDiffPPLib.kernels.pair_gain`'s ``floor`` and
        #: ``max_gain`` (None: no cap); a model file's ``kernel_prior`` may set them (:mod:`LTDiffPPLib.modelfile`)
        self.prior_regularization: dict[str, float | None] = {"floor": PAIR_GAIN_FLOOR, "max_gain": PAIR_GAIN_MAX}

    def set_pair(self, source: Any, target: Any) -> None:
        """Make a kernel-conditioned model convert ``source`` → ``target`` (library names or kernels):
        installs the library gain of the pair as the prior (regularized by :attr:`prior_regularization`) and the
        pair's code for the denoiser (:func:`pair_code`, always with the default regularization it was trained on)."""
        from .kernels import get_kernel, pair_gain

        if not self.config.kernel_conditioned:
            raise ValueError("set_pair is for kernel-conditioned models; this model converts one fixed pair")
        ks, kt = get_kernel(source), get_kernel(target)
        if not (ks.has_response and kt.has_response):
            raise ValueError(f"kernels without a frequency response cannot be converted ({ks.name} → {kt.name})")
        f = np.arange(self.prior.gain.numel()) * self.prior.step
        self.prior.set_gain(torch.from_numpy(pair_gain(ks, kt, f, **self.prior_regularization)).float(), self.prior.step)
        self.pair_code = torch.from_numpy(pair_code(ks, kt))[None].to(self.latent_mean.device)
        self.pair = (ks.name, kt.name)

    def set_latent_stats(self, mean: torch.Tensor | list[float], std: torch.Tensor | list[float]) -> None:
        mean = torch.as_tensor(mean, dtype=torch.float32)
        std = torch.as_tensor(std, dtype=torch.float32)
        if mean.shape != self.latent_mean.shape or std.shape != self.latent_std.shape:
            raise ValueError(f"latent statistics must have {self.config.latent_channels} channels")
        if not torch.all(std > 0):
            raise ValueError("latent std must be positive")
        self.latent_mean.copy_(mean)
        self.latent_std.copy_(std)

    def set_residual_std(self, std: torch.Tensor | list[float]) -> None:
        """Per-channel std of the residual latent (target latent − latent of the filtered source),
        by which the diffusion variable is standardized when the kernel prior is on."""
        std = torch.as_tensor(std, dtype=torch.float32)
        if std.shape != self.residual_std.shape or not torch.all(std > 0):
            raise ValueError(f"residual std must be {self.config.latent_channels} positive values")
        self.residual_std.copy_(std)

    def _stat(self, s: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return s.to(like.dtype)[None, :, None, None]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B,1,H,W) normalized image → standardized latent (B,C_z,H/p,W/p)."""
        z = self.autoencoder.encode(x)
        return (z - self._stat(self.latent_mean, z)) / self._stat(self.latent_std, z)

    def decode_all(self, z: torch.Tensor) -> list[torch.Tensor]:
        """Standardized latent → every deep-supervision output (B,1,H,W), the full output last."""
        z = z * self._stat(self.latent_std, z) + self._stat(self.latent_mean, z)
        return self.autoencoder.decode(z)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Standardized latent → the full-depth image (B,1,H,W)."""
        return self.decode_all(z)[-1]

    def condition(self, x: torch.Tensor, pixel_mm: tuple[float, float], *, base: bool = True) -> Conditioning:
        """The conditioning of a conversion of normalized source images x (B,1,H,W) with pixel size
        ``pixel_mm`` = (dy, dx) mm (used only by the kernel prior). ``base=False`` skips the base image
        (a decoder pass) where only the latent is needed, as in training the denoiser."""
        if self.prior is None:
            return Conditioning(self.encode(x), None)
        filtered = self.prior(x, pixel_mm)
        latent = self.encode(filtered.to(x.dtype))
        return Conditioning(latent, filtered - self.decode(latent).float() if base else None)

    def diffusion_target(self, z_target: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The variable the diffusion model generates for a target latent: the latent itself, or with the
        kernel prior the standardized residual (z_target − cond.latent) / residual_std."""
        self._require_diffusion()
        if self.prior is None:
            return z_target
        return (z_target - cond.latent) / self._stat(self.residual_std, z_target)

    def render(self, z0: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """Image (B,1,H,W) from a generated diffusion variable z0 (the inverse of :meth:`diffusion_target`
        followed by decoding): D(z0), or with the kernel prior base + D(cond.latent + z0 · residual_std).
        For ``"unet++"`` z0 is the source latent itself (nothing is generated)."""
        if self.prior is None:
            return self.decode(z0)
        if cond.base is None:
            raise ValueError("render needs the conditioning's base image (condition(..., base=True))")
        z = cond.latent + z0.to(cond.latent.dtype) * self._stat(self.residual_std, cond.latent)
        return cond.base + self.decode(z).float()

    def predict(self, z_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Denoiser output (v or x0, per ``config.prediction``) for noisy latent z_t at time t given cond."""
        self._require_diffusion()
        if self.config.kernel_conditioned:
            if self.pair is None:
                raise ValueError("a kernel-conditioned model converts the pair set by set_pair(source, target); none is set")
            return self.denoiser(z_t, t, cond, self.pair_code)
        return self.denoiser(z_t, t, cond)

    def _require_diffusion(self) -> None:
        if self.denoiser is None:
            raise ValueError(f"a {self.config.variant!r} model has no diffusion: it converts with "
                             "render(condition(x).latent, cond)")

    def sample_latent(self, cond: torch.Tensor, noise: torch.Tensor, *, steps: int, solver: str = "dpmpp2m",
                      grid: str = "logsnr", callback: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """Reverse diffusion from ``noise`` (B,C_z,h,w) to the target latent given the source latent ``cond``
        (see :func:`LTDiffPPLib.sampler.sample`; the prediction type and schedule are the model's)."""
        from .sampler import sample

        return sample(lambda z, t: self.predict(z, torch.full((z.shape[0],), t, device=z.device), cond), noise,
                      steps=steps, solver=solver, prediction=self.config.prediction, schedule=self.config.schedule,
                      grid=grid, callback=callback)
