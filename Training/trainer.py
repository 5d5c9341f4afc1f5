"""The three-phase LTDiff++ training loop, single process or DDP (torchrun), with exact resume.

    phase 1  UNet++ autoencoder on patches of both kernels, deep supervision;   then latent statistics
    phase 2  conditional latent denoiser on pairs (autoencoder frozen), v-prediction MSE
    phase 3  denoiser + decoder jointly: latent fidelity + image L1 + noise-power loss on decoded samples

With ``model.kernel_prior`` the kernel ratio is first fitted on the training pairs
(:func:`LTDiffPPLib.baselines.kernel_ratio_from_dataset`) and phases 2–3 learn the residual over the
filtered source (:mod:`LTDiffPPLib.models`); after phase 1 the residual latent's std is measured too.
With ``model.kernel_conditioned`` (a multi-kernel dataset) nothing is fitted: every batch is one ordered
pair of the dataset's kernels (:meth:`Training.data.PatchSampler.pair_of`), and the model is set to it
(:meth:`LTDiffPPLib.models.LTDiffPPNet.set_pair`: the library's gain as prior, the pair's code for the
denoiser) before the batch's forward pass.
``autoencoder_from`` starts at phase 2 with the autoencoder (and latent statistics) of an earlier run.

The paper's comparison models (``model.variant``) train with the same loop, running only their phases
(:data:`Training.config.VARIANT_PHASES`): ``"unet++"`` phase 1 on pairs (source in, target out, deep
supervision L1 + noise-power loss), ``"pixel-ddpm"`` phases 2–3 on pixel-unshuffled images,
``"single-scale-ldm"`` all three. Latent statistics are measured only for a latent diffusion model.

Each phase starts from the previous phase's EMA weights. Checkpoints (``run_dir/checkpoints``) hold the
model, EMA, optimizer, LR schedule, phase, step, latent statistics and elapsed time; they are written
atomically and read with ``torch.load(weights_only=True)`` (tensors and plain containers only, no code).
Batches and noise are pure functions of (seed, phase, step, rank), so ``resume`` continues with exactly
the batches an uninterrupted run would have drawn: the final weights are identical.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from LTDiffPPLib.datasets import load_dataset
from LTDiffPPLib.guard import ANY_KERNEL
from LTDiffPPLib.kernels import ordered_pairs
from LTDiffPPLib.inference import autocast_for, pick_device
from LTDiffPPLib.io import cpu_name
from LTDiffPPLib.modelfile import default_metadata, save_model
from LTDiffPPLib.models import LTDiffPPNet
from LTDiffPPLib.sampler import add_noise

from .config import TrainConfig
from .data import PatchSampler

# --------------------------------------------------------------------------------------------- losses


def radial_log_power(img: torch.Tensor, bands: int = 16) -> torch.Tensor:
    """Batch-mean power spectrum of (B, 1, P, P) images in ``bands`` radial bands, log scale (bands,)."""
    p = img.shape[-1]
    spec = torch.fft.rfft2(img - img.mean(dim=(-2, -1), keepdim=True), norm="ortho").abs().square().mean(dim=(0, 1))
    fy = torch.fft.fftfreq(p, device=img.device)[:, None]
    fx = torch.fft.rfftfreq(p, device=img.device)[None, :]
    idx = torch.clamp((torch.sqrt(fy**2 + fx**2) / 0.5 * bands).long(), max=bands - 1)
    power = torch.zeros(bands, device=img.device, dtype=spec.dtype).index_add_(0, idx.ravel(), spec.ravel())
    count = torch.zeros(bands, device=img.device, dtype=spec.dtype).index_add_(0, idx.ravel(), torch.ones_like(spec).ravel())
    return torch.log(power / count.clamp(min=1) + 1e-8)


class PhaseLoss(nn.Module):
    """The loss of one phase as a module, so DDP sees a forward() over the whole network."""

    def __init__(self, net: LTDiffPPNet, cfg: TrainConfig, phase: int, pixel_mm: tuple[float, float]) -> None:
        super().__init__()
        self.net, self.cfg, self.phase, self.pixel_mm = net, cfg, phase, pixel_mm

    def forward(self, src: torch.Tensor, tgt: torch.Tensor, gen: torch.Generator) -> dict[str, torch.Tensor]:
        """Losses of a batch of (B, 1, P, P) normalized source and target patches; ``gen`` draws t and noise."""
        net, cfg = self.net, self.cfg
        if self.phase == 1:
            return self._autoencoder_loss(src, tgt)
        # phase 3 trains the decoder, which the conditioning's base image (kernel prior) depends on
        with torch.no_grad() if self.phase == 2 else contextlib.nullcontext():
            cond = net.condition(src, self.pixel_mm, base=self.phase == 3)
        with torch.no_grad():
            x0 = net.diffusion_target(net.encode(tgt), cond)
        t = torch.rand(x0.shape[0], generator=gen, device="cpu").to(x0.device)
        eps = torch.randn(x0.shape, generator=gen, device="cpu").to(x0.device)
        z_t, v = add_noise(x0, eps, t, net.config.schedule)
        target = v if net.config.prediction == "v" else x0
        fidelity = F.mse_loss(net.predict(z_t, t, cond.latent.detach()), target)
        if self.phase == 2:
            return {"loss": fidelity}
        noise = torch.randn(x0.shape, generator=gen, device="cpu").to(x0.device)
        z0 = net.sample_latent(cond.latent.detach(), noise, steps=cfg.phase3_sample_steps)
        img = net.render(z0, cond)
        image = F.l1_loss(img, tgt)
        nps = (radial_log_power(img) - radial_log_power(tgt)).abs().mean()
        return {"loss": fidelity + cfg.lambda_image * image + cfg.lambda_nps * nps,
                "fidelity": fidelity.detach(), "image_l1": image.detach(), "nps": nps.detach()}

    def _autoencoder_loss(self, src: torch.Tensor, tgt: torch.Tensor) -> dict[str, torch.Tensor]:
        """Phase 1: deep-supervision L1 of the decoder heads. An autoencoder for latent diffusion
        reconstructs patches of both kernels; the ``"unet++"`` direct translator maps source to target,
        plus ``lambda_nps`` · noise-power distance so the target's grain is not averaged away."""
        translate = not self.net.config.has_diffusion
        x, y = (src, tgt) if translate else (torch.cat([src, tgt]),) * 2
        outs = self.net.autoencoder.decode(self.net.autoencoder.encode(x))
        w = self.cfg.deep_supervision_weights[-len(outs):]
        rec = sum(wi * F.l1_loss(o, y) for wi, o in zip(w, outs)) / sum(w)
        losses = {"loss": rec, "l1_full": F.l1_loss(outs[-1], y).detach()}
        if translate:
            nps = (radial_log_power(outs[-1]) - radial_log_power(y)).abs().mean()
            losses.update(loss=rec + self.cfg.lambda_nps * nps, nps=nps.detach())
        return losses


def trainable(net: LTDiffPPNet, phase: int) -> list[nn.Parameter]:
    """Parameters trained in ``phase``. The encoder is frozen after phase 1; phase 3 decodes only the
    full-depth output, so the decoder's coarser deep-supervision heads (phase-1 aids) stay as they are."""
    if phase == 1:
        return list(net.autoencoder.parameters())
    if phase == 2:
        return list(net.denoiser.parameters())
    return list(net.denoiser.parameters()) + net.autoencoder.full_decoder_parameters()


# -------------------------------------------------------------------------------------------- trainer


class Trainer:
    """Runs the phases of ``cfg`` in ``run_dir``; ``resume="auto"`` continues from the last checkpoint."""

    def __init__(self, cfg: TrainConfig, run_dir: str | os.PathLike, *, device: str = "auto",
                 resume: str | None = None, stop_after: tuple[int, int] | None = None,
                 log: Callable[[str], None] = print) -> None:
        self.cfg, self.run_dir, self.log_fn = cfg, Path(run_dir), log
        self.stop_after = stop_after  # (phase, step): stop there as if killed (tests of resume)
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        self.device = pick_device(device)
        if self.device.type == "cuda" and self.world > 1:
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        dataset = load_dataset(cfg.dataset)
        self.conditioned = cfg.model_config.kernel_conditioned
        if self.conditioned != dataset.multikernel:
            raise ValueError(f"dataset {cfg.dataset}: a kernel-conditioned model trains on a multi-kernel dataset, "
                             f"a model of one pair on a paired one (model.kernel_conditioned is {self.conditioned})")
        self.kernels = tuple(dataset.kernels)
        # the pairs drawn: every ordered pair of the dataset's kernels (different responses) or its one pair
        kernel_pairs = ordered_pairs(self.kernels) if self.conditioned else None
        self.dataset_summary = {"path": str(cfg.dataset), "pairs": len(dataset.pairs),
                                "train_pairs": len(dataset.subset("train")), "val_pairs": len(dataset.subset("val"))}
        cfg.validate()
        torch.manual_seed(cfg.seed)
        self.net = LTDiffPPNet(cfg.model_config).to(self.device)
        pair = (ANY_KERNEL, ANY_KERNEL) if self.conditioned else self.kernels
        self.meta = default_metadata(cfg.model_config, name=cfg.export_name, source_kernel=pair[0],
                                     target_kernel=pair[1], description=cfg.description)
        if self.conditioned:
            self.meta["kernels"] = list(self.kernels)
        self.meta["sampling"] = {**self.meta["sampling"], **cfg.sampling}
        inplane = [s for p in dataset.subset("train") for s in p["spacing_mm"][:2]]
        self.meta["pixel_spacing_mm"] = [round(min(inplane), 4), round(max(inplane), 4)]
        self.pixel_mm = (float(np.mean(inplane)),) * 2  # (dy, dx) of the training patches
        if self.conditioned:
            self.meta["kernel_prior"] = {"from": "the kernel library: G = W_target / W_source of each pair, "
                                                 "regularized (LTDiffPPLib.kernels.pair_gain)", "pixel_mm": list(self.pixel_mm)}
        elif self.net.prior is not None:
            self._fit_kernel_prior(dataset)
        self.train = PatchSampler(dataset, "train", cfg.patch, self.meta["hu"], cfg.seed, kernel_pairs)
        self.val = (PatchSampler(dataset, "val", cfg.patch, self.meta["hu"], cfg.seed + 1, kernel_pairs)
                    if dataset.subset("val") else None)
        self.ema = copy.deepcopy(self.net).eval().requires_grad_(False)
        self.phase, self.step, self.elapsed = cfg.phases[0], 0, 0.0
        self.history: list[dict[str, Any]] = []
        self._new_optimizer(self.phase)
        if self.rank == 0:
            (self.run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        if resume:
            self._resume(resume)
        if cfg.autoencoder_from:
            from LTDiffPPLib.modelfile import sha256_file

            self.meta["autoencoder_from"] = {"path": str(cfg.autoencoder_from),
                                             "sha256": sha256_file(cfg.autoencoder_from)}
            if (self.phase, self.step) == (cfg.phases[0], 0):
                self._load_autoencoder(cfg.autoencoder_from)
        self.tb = _tensorboard_writer(self.run_dir / "tensorboard") if cfg.tensorboard and self.rank == 0 else None

    # ------------------------------------------------------------------------------------------ loop

    def run(self) -> bool:
        """Train until all phases are done (True) or ``stop_after`` is reached (False)."""
        for phase in self.cfg.phases:
            if phase < self.phase:
                continue
            if phase > self.phase:
                self.phase, self.step = phase, 0
                self._new_optimizer(phase)
            if not self._run_phase(phase):
                return False
        return True

    def _run_phase(self, phase: int) -> bool:
        pc = self.cfg.phase(phase)
        for p in self.net.parameters():
            p.requires_grad_(False)
        params = trainable(self.net, phase)
        for p in params:
            p.requires_grad_(True)
        module: nn.Module = PhaseLoss(self.net, self.cfg, phase, self.pixel_mm)
        if self.world > 1:
            # buffers are set alike on every rank (statistics are all-reduced) except a kernel-conditioned
            # model's pair, which is each rank's own batch's: never broadcast rank 0's
            module = nn.parallel.DistributedDataParallel(module, device_ids=[self.device] if self.device.type == "cuda" else None,
                                                         broadcast_buffers=False)
        bar = self._bar(phase, pc.steps)
        autocast = autocast_for(self.device)  # bf16 on CUDA
        t_last = time.perf_counter()
        window_t0, window_steps = None, 0  # the training steps since the last log record (throughput)
        while self.step < pc.steps:
            if self.stop_after == (phase, self.step):
                return False
            if window_t0 is None:
                window_t0, window_steps = time.perf_counter(), 0
            src, tgt = self.train.batch(pc.batch_size, phase, self.step, self.rank)
            self._set_pair(self.net, self.train, phase, self.step, self.rank)
            gen = torch.Generator().manual_seed(_seed(self.cfg.seed, phase, self.step, self.rank))
            with autocast:
                out = module(src.to(self.device), tgt.to(self.device), gen)
            self.opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
            self.opt.step()
            self.sched.step()
            self._update_ema()
            self.step += 1
            window_steps += 1
            now = time.perf_counter()
            self.elapsed += now - t_last
            t_last = now
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{out['loss'].item():.4f}")
            if self.step % self.cfg.log_every == 0 or self.step == pc.steps:
                record = {"phase": phase, "step": self.step, "lr": self.sched.get_last_lr()[0],
                          "grad_norm": float(grad_norm), **{k: float(v.detach()) for k, v in out.items()}}
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                step_s = (time.perf_counter() - window_t0) / window_steps
                # throughput of the training steps alone (validation and checkpoints come after this)
                record.update(step_seconds=step_s, patches_per_s=pc.batch_size * self.world / step_s)
                self._log(record)
                window_t0 = None
            if self.val is not None and (self.step % self.cfg.val_every == 0 or self.step == pc.steps):
                self._log({"phase": phase, "step": self.step, "val_loss": self.validate(phase)})
                self._log_panel(phase)
            if self.step == pc.steps:
                self._end_phase(phase)
            if self.step % self.cfg.checkpoint_every == 0 or self.step == pc.steps:
                self.save_checkpoint()
        if bar is not None:
            bar.close()
        if self.tb is not None:
            self.tb.flush()
        return True

    def _end_phase(self, phase: int) -> None:
        """The next phase starts from this phase's EMA weights; after phase 1, measure latent statistics
        (of a latent diffusion model: a direct translator's latent is no diffusion variable)."""
        self.net.load_state_dict(self.ema.state_dict())
        if phase == 1 and self.net.config.latent_diffusion:
            self._latent_stats()
            self._residual_stats()

    def _set_pair(self, net: LTDiffPPNet, sampler: PatchSampler, phase: int, step: int, rank: int = 0) -> None:
        """A kernel-conditioned model converts the pair of batch (phase, step, rank) of ``sampler``."""
        if self.conditioned:
            net.set_pair(*sampler.pair_of(phase, step, rank))

    def _fit_kernel_prior(self, dataset) -> None:
        """Fit the kernel ratio on the training pairs and install it as the model's prior (before the EMA
        copy is made, which inherits it)."""
        from LTDiffPPLib.baselines import kernel_ratio_from_dataset

        ratio, (dy, dx) = kernel_ratio_from_dataset(dataset, "train")
        self.pixel_mm = (dy, dx)
        gain = torch.from_numpy(ratio.table(self.net.prior.step, self.net.prior.gain.numel())).float()
        self.net.prior.set_gain(gain, self.net.prior.step)
        self.meta["kernel_prior"] = {"fitted_on": f"{self.dataset_summary['path']} (train split, "
                                                  f"{self.dataset_summary['train_pairs']} pairs)",
                                     "pixel_mm": [dy, dx], "band_per_mm": [ratio.f_lo, ratio.f_hi],
                                     "extrapolation": ratio.extrapolation}

    def _load_autoencoder(self, source: str) -> None:
        """Start at phase 2 with the autoencoder of a checkpoint (``.pt``) or model file (``.safetensors``)."""
        from LTDiffPPLib.modelfile import load_model

        if str(source).endswith(".safetensors"):
            state = load_model(source, verify_registry=False).net.state_dict()
        else:
            state = torch.load(source, map_location="cpu", weights_only=True)["ema"]
        ae = {k.removeprefix("autoencoder."): v for k, v in state.items() if k.startswith("autoencoder.")}
        for net in (self.net, self.ema):
            net.autoencoder.load_state_dict(ae, strict=True)
        self._latent_stats()
        self._residual_stats()
        self.phase, self.step = 2, 0
        self._new_optimizer(2)
        self.log_fn(f"phase 1 skipped: autoencoder from {source}")

    @torch.no_grad()
    def _residual_stats(self, batches: int = 8) -> None:
        """With the kernel prior: per-channel std of the residual latent (target − filtered source)."""
        if self.net.prior is None:
            return
        if self.conditioned:  # one pair per batch: see more of them
            batches *= 4
        res = []
        for i in range(batches):
            src, tgt = self.train.batch(self.cfg.phase2.batch_size, 0, batches + i, self.rank)
            self._set_pair(self.net, self.train, 0, batches + i, self.rank)
            src, tgt = src.to(self.device), tgt.to(self.device)
            res.append((self.net.encode(tgt) - self.net.condition(src, self.pixel_mm, base=False).latent).float())
        _, std = self._channel_stats(res)
        for net in (self.net, self.ema):
            net.set_residual_std(std.clamp(min=1e-6).cpu())

    @torch.no_grad()
    def _latent_stats(self, batches: int = 8) -> None:
        zs = []
        for i in range(batches):
            src, tgt = self.train.batch(self.cfg.phase1.batch_size, 0, i, self.rank)
            zs.append(self.net.autoencoder.encode(torch.cat([src, tgt]).to(self.device)).float())
        mean, std = self._channel_stats(zs)
        for net in (self.net, self.ema):
            net.set_latent_stats(mean.cpu(), std.clamp(min=1e-6).cpu())

    def _channel_stats(self, batches: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel mean and std (C,) of (B, C, h, w) batches, pooled over all DDP ranks."""
        z = torch.cat(batches).transpose(0, 1).reshape(batches[0].shape[1], -1)
        if self.world == 1:
            return z.mean(1), z.std(1)
        moments = torch.stack([z.mean(1), z.square().mean(1)])
        dist.all_reduce(moments)
        moments /= self.world
        return moments[0], (moments[1] - moments[0] ** 2).clamp(min=1e-12).sqrt()

    @torch.no_grad()
    def validate(self, phase: int) -> float:
        """Mean loss of ``phase`` over fixed validation batches (EMA weights)."""
        module = PhaseLoss(self.ema, self.cfg, phase, self.pixel_mm)
        losses = []
        for i in range(self.cfg.val_batches):
            src, tgt = self.val.batch(self.cfg.phase(phase).batch_size, phase, i)
            self._set_pair(self.ema, self.val, phase, i)
            gen = torch.Generator().manual_seed(10_000 + i)
            losses.append(float(module(src.to(self.device), tgt.to(self.device), gen)["loss"]))
        return float(np.mean(losses))

    def _update_ema(self) -> None:
        d = self.cfg.ema_decay
        with torch.no_grad():
            for e, p in zip(self.ema.parameters(), self.net.parameters()):
                e.lerp_(p, 1 - d)

    def _new_optimizer(self, phase: int) -> None:
        pc = self.cfg.phase(phase)
        self.opt = torch.optim.AdamW(trainable(self.net, phase), lr=pc.lr, weight_decay=self.cfg.weight_decay)

        def schedule(i: int) -> float:  # linear warm-up, then cosine decay to 10 %
            if i < pc.warmup:
                return (i + 1) / pc.warmup
            x = (i - pc.warmup) / max(1, pc.steps - pc.warmup)
            return 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, x)))

        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, schedule)

    # ------------------------------------------------------------------------------------ checkpoints

    def save_checkpoint(self) -> Path | None:
        """Write ``checkpoints/ckpt-p{phase}-s{step}.pt`` atomically (rank 0), keep the newest few."""
        if self.rank != 0:
            return None
        ckpt_dir = self.run_dir / "checkpoints"
        path = ckpt_dir / f"ckpt-p{self.phase}-s{self.step:07d}.pt"
        state = {
            "format": "ltdiffpp-checkpoint", "format_version": 1, "phase": self.phase, "step": self.step,
            "net": self.net.state_dict(), "ema": self.ema.state_dict(), "opt": self.opt.state_dict(),
            "sched": self.sched.state_dict(), "latent_mean": self.net.latent_mean.cpu(),
            "latent_std": self.net.latent_std.cpu(), "residual_std": self.net.residual_std.cpu(),
            "elapsed": self.elapsed, "history": json.dumps(self.history),
            "config": json.dumps(self.cfg.to_dict()),
        }
        tmp = ckpt_dir / f".{path.name}.tmp-{os.getpid()}"
        torch.save(state, tmp)
        os.replace(tmp, path)
        for old in sorted(ckpt_dir.glob("ckpt-*.pt"))[: -self.cfg.keep_checkpoints]:
            old.unlink()
        return path

    def _resume(self, resume: str) -> None:
        candidates = sorted((self.run_dir / "checkpoints").glob("ckpt-*.pt")) if resume == "auto" else [Path(resume)]
        for path in reversed(candidates):
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
                if state.get("format") != "ltdiffpp-checkpoint":
                    raise ValueError("not an LTDiffPP checkpoint")
            except Exception as exc:  # a damaged checkpoint: fall back to the previous one
                warnings.warn(f"checkpoint {path} is unreadable ({exc}); trying the previous one", stacklevel=2)
                continue
            self.phase, self.step = int(state["phase"]), int(state["step"])
            self.net.load_state_dict(state["net"])
            self.ema.load_state_dict(state["ema"])
            for net in (self.net, self.ema):
                net.set_latent_stats(state["latent_mean"], state["latent_std"])
                net.set_residual_std(state["residual_std"])
            self._new_optimizer(self.phase)
            self.opt.load_state_dict(state["opt"])
            self.sched.load_state_dict(state["sched"])
            self.elapsed = float(state["elapsed"])
            self.history = json.loads(state["history"])
            self.log_fn(f"resumed from {path} (phase {self.phase}, step {self.step})")
            return
        if resume != "auto" or candidates:
            raise FileNotFoundError(f"no usable checkpoint in {self.run_dir / 'checkpoints'}")

    # ---------------------------------------------------------------------------------------- export

    def export(self, path: str | os.PathLike, *, overwrite: bool = False, evaluation: dict[str, Any] | None = None) -> str:
        """Write the EMA model as an LTDiffPP model file with its model card; returns the SHA-256.

        ``evaluation``: measured results (e.g. CCC on validation data, with the command) for the card.
        """
        meta = dict(self.meta)
        hw = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else f"{cpu_name()}, {torch.get_num_threads()} threads"
        meta["training"] = {
            "status": "trained", "variant": self.cfg.model_config.variant,
            "phases": {str(p): self.cfg.phase(p).steps for p in self.cfg.phases if p > 1 or not self.cfg.autoencoder_from}, "seed": self.cfg.seed,
            "wall_time_s": round(self.elapsed, 1), "hardware": f"{self.device.type}: {hw} x{self.world}",
            "throughput": self.throughput(),
            "torch": torch.__version__, "dataset": self.dataset_summary, "config": self.cfg.to_dict(),
            "final": {k: v for k, v in (self.history[-1] if self.history else {}).items()},
            "evaluation": evaluation or {},
        }
        return save_model(self.ema, path, meta, overwrite=overwrite, weights_dtype=self.cfg.export_weights_dtype)

    def throughput(self) -> dict[str, dict[str, float]]:
        """Per trained phase: batch size (per process), median seconds per training step and patches
        (``patch``² px, all processes together) per second over the logged windows; validation and
        checkpoints not included."""
        out = {}
        for p in self.cfg.phases:
            secs = [r["step_seconds"] for r in self.history if r.get("phase") == p and "step_seconds" in r]
            if secs:
                step_s = float(np.median(secs))
                bs = self.cfg.phase(p).batch_size
                out[str(p)] = {"batch_size": bs, "step_seconds": round(step_s, 4),
                               "patches_per_s": round(bs * self.world / step_s, 2)}
        return out

    # --------------------------------------------------------------------------------------- logging

    def _global_step(self, phase: int) -> int:
        """Steps since the start of training (TensorBoard's x axis runs on across phases)."""
        return sum(self.cfg.phase(p).steps for p in self.cfg.phases if p < phase) + self.step

    def _log(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        if self.rank == 0:
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            phase = record["phase"]
            for k, v in record.items():
                if k not in ("phase", "step"):
                    self.tb.add_scalar(f"phase{phase}/{k}", v, self._global_step(phase))

    @torch.no_grad()
    def _log_panel(self, phase: int) -> None:
        """TensorBoard image: source | EMA output (reconstruction of the target in phase 1, conversion
        after it and by a direct translator) | target."""
        if self.tb is None:
            return
        src, tgt = self.val.batch(2, phase, 0)
        self._set_pair(self.ema, self.val, phase, 0)
        src, tgt = src.to(self.device), tgt.to(self.device)
        if not self.ema.config.has_diffusion:
            out = self.ema.decode(self.ema.encode(src))
        elif phase == 1:
            out = self.ema.decode(self.ema.encode(tgt))
        else:
            cond = self.ema.condition(src, self.pixel_mm)
            noise = torch.randn(cond.latent.shape, generator=torch.Generator().manual_seed(0)).to(self.device)
            sampling = self.meta["sampling"]
            z0 = self.ema.sample_latent(cond.latent, noise, steps=int(sampling["steps"]), solver=sampling["solver"],
                                        grid=sampling.get("grid", "logsnr"))
            out = self.ema.render(z0, cond)
        hu = self.meta["hu"]
        lo, hi = (-1350.0 - hu["center"]) / hu["scale"], (150.0 - hu["center"]) / hu["scale"]  # lung window
        rows = [torch.cat([src[i, 0], out[i, 0], tgt[i, 0]], dim=1) for i in range(src.shape[0])]
        panel = ((torch.cat(rows, dim=0).float().cpu() - lo) / (hi - lo)).clamp(0, 1)
        self.tb.add_image("val/source_converted_target", panel[None], self._global_step(phase))

    def _bar(self, phase: int, total: int):
        if self.rank != 0:
            return None
        from tqdm import tqdm

        return tqdm(total=total, initial=self.step, desc=f"phase {phase}", unit="step", leave=True)


def _tensorboard_writer(log_dir: Path):
    """A TensorBoard SummaryWriter, or None (with a note) when the tensorboard package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        warnings.warn("tensorboard is not installed; logging to metrics.jsonl only "
                      "(pip install tensorboard, or the project's [train] extra)", stacklevel=2)
        return None
    return SummaryWriter(str(log_dir))


def _seed(*keys: int) -> int:
    """A 63-bit seed that is a pure function of ``keys`` (the same in every process)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1, np.uint64)[0] >> 1)
