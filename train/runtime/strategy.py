"""DeepSpeed ZeRO for methods with several trainable networks: one DeepSpeed engine per network.

Lightning's `DeepSpeedStrategy` wraps the whole LightningModule in one engine with one optimizer and
runs only on CUDA. The methods here train up to three networks (one-step distillation: generator, fake
score, discriminator), each with its own optimizer and update rate, beside frozen ones (the teacher).
`MultiEngineDeepSpeed` keeps Lightning's DeepSpeed plumbing (config, distributed start-up, launchers,
registry) and changes what is wrapped:

- each network named by the module's `trainable_networks()` (one per optimizer of `configure_optimizers`,
  same order) gets its own engine (`deepspeed.initialize` with that optimizer and a copy of the config,
  `gradient_clipping` taken from the module's `gradient_clip(name)`);
- the networks stay where they are in the module tree and are called directly, so the module's code,
  state-dict keys and EMA are the same as without DeepSpeed; frozen networks are never wrapped: at
  stages 1-2 they are plain replicas, at stage 3 they stay replicas too unless they are part of a
  trainable network (a LoRA fake score's frozen base is partitioned with its engine, which gathers it
  for the teacher's adapters-off calls as for any other forward);
- `backward` runs one autograd pass for the whole loss and brackets it with the prologue/epilogue of
  every engine that has parameters requiring grad, so a loss that reaches several networks (the
  discriminator loss through the fake score's features) reduces each network's gradients in its own
  engine; `optimizer_step` steps the engine that owns the optimizer (clipping, ZeRO update, zero grad);
- `load_network` loads full weights into a trainable network mid-run (gathering and re-partitioning at stage 3)
  and refreshes its engine's fp32 master partitions, so a method may restart its student (progressive rounds);
- precision: fp32 weights, gradients and optimizer states in every engine; "bf16-mixed" computes in
  bf16 through autocast. fp16 needs loss scaling shared by all engines and is refused;
- checkpoints are directories: one DeepSpeed checkpoint per engine (`<name>/`, every rank writes its
  shard and its optimizer state) and `lightning.pt` (the rest of the Lightning checkpoint: loops,
  callbacks, schedulers, the guidedistill record, and the weights outside the engines), written to a
  temporary directory and renamed. `convert_zero_checkpoint` turns one into a plain `.ckpt` file.

On CPU it runs with the gloo backend through DeepSpeed's CPU accelerator, so two-process ZeRO runs are
part of the test suite. Select it in a config with `trainer.strategy: zero2` (or zero1, zero3,
zero2_offload, zero3_offload) or `class_path: train.runtime.strategy.MultiEngineDeepSpeed`.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, StrategyRegistry
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor

LIGHTNING_FILE = "lightning.pt"
ENGINE_TAG = "checkpoint"
PRECISIONS = ("32-true", "32", "bf16-mixed")


class EnginePrecision(Precision):
    """Precision for `MultiEngineDeepSpeed`: fp32 weights everywhere; "bf16-mixed" autocasts compute to bf16.

    Backward and optimizer steps are delegated to the strategy (which brackets them with the engines'
    gradient reduction); gradient clipping is each engine's `gradient_clipping`."""

    def __init__(self, precision: str, device_type: str = "cpu"):
        if str(precision) not in PRECISIONS:
            raise ValueError(f"precision {precision!r} is not supported by the multi-engine DeepSpeed strategy; use "
                             f"32-true or bf16-mixed (fp16 would need one loss scale shared by every engine)")
        self.precision, self.device_type = str(precision), device_type

    def forward_context(self):
        if self.precision == "bf16-mixed":
            # no cast cache: ZeRO-3 swaps partitioned weights in and out between uses, so a cached bf16 copy
            # could outlive (or be taken from) a partitioned, empty weight
            return torch.autocast(self.device_type, dtype=torch.bfloat16, cache_enabled=False)
        return contextlib.nullcontext()

    def backward(self, tensor: Tensor, model, optimizer, *args, **kwargs) -> None:
        model.trainer.strategy.engine_backward(tensor)

    def optimizer_step(self, optimizer, model, closure, **kwargs):
        result = closure()
        self._after_closure(model, optimizer)
        if result is None and model.automatic_optimization:
            return None  # training_step skipped this batch: no update at all
        applied = model.trainer.strategy.step_engine(optimizer)
        guard = getattr(model, "nonfinite_guard", None)
        if not applied and guard is not None and not getattr(model, "update_skipped", False):
            # the engine found a NaN/inf gradient norm, cleared the gradients and skipped the update
            # (DeepSpeed's own check); report it under the module's NaN/inf policy like any other
            guard.handle(int(model.global_step), "DeepSpeed engine", {"gradient norm": float("nan")})
        return None

    def clip_gradients(self, *args, **kwargs) -> None:
        """Clipping is each engine's (DeepSpeed config `gradient_clipping`)."""


class MultiEngineDeepSpeed(DeepSpeedStrategy):
    """ZeRO stage 1-3 with one DeepSpeed engine per trainable network (see the module docstring).

    stage:                    ZeRO stage 1, 2 or 3.
    offload_optimizer:        optimizer states (and, at stage 3, `offload_parameters` the weights) on CPU.
    activation_checkpointing: recompute activations in backward (the networks' own
                              `enable_gradient_checkpointing`, as diffusers models provide).
    Other keyword arguments go to Lightning's DeepSpeedStrategy (e.g. `config` for a full DeepSpeed config).
    """

    strategy_name = "guidedistill_deepspeed"

    def __init__(self, stage: int = 2, offload_optimizer: bool = False, offload_parameters: bool = False,
                 activation_checkpointing: bool = False, **kwargs: Any):
        if stage not in (1, 2, 3):
            raise ValueError(f"ZeRO stage must be 1, 2 or 3, got {stage}")
        if offload_parameters and stage != 3:
            raise ValueError("offload_parameters needs ZeRO stage 3 (only stage 3 partitions the weights)")
        super().__init__(stage=stage, offload_optimizer=offload_optimizer, offload_parameters=offload_parameters,
                         **kwargs)
        self.activation_checkpointing = activation_checkpointing
        self.engines: dict[str, Any] = {}

    # --- environment -------------------------------------------------------------------------------
    @property
    def precision_plugin(self) -> Precision:
        return self._precision_plugin if self._precision_plugin is not None else EnginePrecision("32-true")

    @precision_plugin.setter
    def precision_plugin(self, plugin: Precision | None) -> None:
        # the accelerator connector hands every DeepSpeedStrategy a DeepSpeedPrecision; keep its precision only
        if plugin is not None and not isinstance(plugin, EnginePrecision):
            plugin = EnginePrecision(getattr(plugin, "precision", "32-true"))
        self._precision_plugin = plugin

    def _format_config(self) -> None:
        # DeepSpeedStrategy's version also writes fp16/bf16 sections, which would make the engines keep half
        # weights; precision here is autocast (EnginePrecision), so only batch size and clipping are filled in
        self._format_batch_size_and_grad_accum_config()

    def setup_environment(self) -> None:
        device = self.root_device.type
        if device == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        from deepspeed.accelerator import get_accelerator

        if get_accelerator().device_name() != device:
            raise RuntimeError(f"DeepSpeed uses the {get_accelerator().device_name()!r} accelerator but the trainer "
                               f"runs on {device!r}; set DS_ACCELERATOR={device} before starting")
        self._precision_plugin.device_type = device
        DDPStrategy.setup_environment(self)  # not DeepSpeedStrategy's, which refuses anything but CUDA

    def setup_distributed(self) -> None:
        from lightning.fabric.utilities.seed import reset_seed

        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    # --- engines -----------------------------------------------------------------------------------
    def setup(self, trainer) -> None:
        self._init_config_if_needed()
        self.accelerator.setup(trainer)
        self.model_to_device()
        self.optimizers, self.lr_scheduler_configs = [], []
        if trainer.state.fn == TrainerFn.FITTING:
            if trainer.accumulate_grad_batches != 1:
                raise ValueError("accumulate_grad_batches must be 1 with the multi-engine DeepSpeed strategy; "
                                 "raise the batch size or the number of processes instead")
            self._build_engines(trainer)
        self.setup_precision_plugin()
        self.barrier()

    def init_deepspeed(self) -> None:  # Lightning's single-engine set-up; replaced by _build_engines
        raise NotImplementedError

    def _build_engines(self, trainer) -> None:
        import deepspeed
        from lightning.pytorch.core.optimizer import _init_optimizers_and_lr_schedulers

        module = self.lightning_module
        networks = module.trainable_networks()
        optimizers, schedulers = _init_optimizers_and_lr_schedulers(module)
        if len(networks) != len(optimizers):
            raise ValueError(f"{type(module).__name__}.trainable_networks() names {len(networks)} network(s) "
                             f"({', '.join(networks)}) but configure_optimizers returns {len(optimizers)} "
                             f"optimizer(s); give one network per optimizer, in the same order")
        self.engines = {}
        for (name, net), opt in zip(networks.items(), optimizers):
            owned = {id(p) for p in net.parameters()}
            if any(id(p) not in owned for g in opt.param_groups for p in g["params"]):
                raise ValueError(f"optimizer {len(self.engines)} of {type(module).__name__} updates parameters "
                                 f"outside network {name!r}; each optimizer must update one network's weights")
            if self.activation_checkpointing and hasattr(net, "enable_gradient_checkpointing"):
                net.enable_gradient_checkpointing()  # small heads (a discriminator) have none and need none
            config = copy.deepcopy(self.config)
            # offload: the module's own (torch) optimizer steps the CPU copy; DeepSpeedCPUAdam would be faster
            # but is a different optimizer than the one the method configured
            config["zero_force_ds_cpu_optimizer"] = False
            clip = module.gradient_clip(name)
            config["gradient_clipping"] = float(clip if clip is not None else (trainer.gradient_clip_val or 0.0))
            engine, ds_optimizer, _, _ = deepspeed.initialize(
                args=argparse.Namespace(device_rank=-1 if self.root_device.index is None else self.root_device.index),
                config=config, model=net,
                model_parameters=[p for p in net.parameters() if p.requires_grad], optimizer=opt,
                dist_init_required=False)
            self.engines[name] = engine
        if self.activation_checkpointing and not any(hasattr(n, "enable_gradient_checkpointing") for n in networks.values()):
            raise ValueError(f"activation_checkpointing: none of {', '.join(networks)} supports it (no "
                             f"enable_gradient_checkpointing()); turn the option off")
        self.optimizers = [e.optimizer for e in self.engines.values()]
        self.lr_scheduler_configs = schedulers

    def engine_backward(self, loss: Tensor) -> None:
        """One backward pass of `loss`, reduced by every engine whose network has parameters requiring grad.

        DeepSpeed's own `engine.backward` serves one engine and expects the network's outputs to have come
        through `engine.forward`; here the networks are called directly and one loss may reach several of
        them (or only intermediate features of one), so each engine's prologue runs before the pass and its
        epilogue (flush of the gradient buckets, reduce-scatter) after it, exactly as `engine.backward`
        brackets its own pass."""
        active = [e for e in self.engines.values() if any(p.requires_grad for p in e.module.parameters())]
        for e in active:
            e._running_engine_backward_count += 1
            e._running_engine_backward = True
            e._backward_prologue()
        try:
            loss.backward()
            for e in active:
                e._backward_epilogue()
        finally:
            for e in active:
                e._running_engine_backward_count -= 1
                e._running_engine_backward = e._running_engine_backward_count > 0

    def step_engine(self, optimizer) -> bool:
        """Step the engine owning `optimizer` (clip, ZeRO update, zero its gradients); False when the engine
        skipped the update because the gradient norm was NaN/inf."""
        for engine in self.engines.values():
            if engine.optimizer is optimizer or getattr(optimizer, "optimizer", None) is engine.optimizer:
                engine.step()
                return not getattr(engine.optimizer, "overflow", False)
        raise ValueError("optimizer_step got an optimizer that belongs to no DeepSpeed engine; step the optimizers "
                         "returned by self.optimizers()")

    def load_network(self, name: str, state: dict[str, Tensor], clear_optimizer: bool = True) -> None:
        """Load full weights `state` (keys of the network's own state dict, the same on every rank) into trainable
        network `name` mid-training, as a method that restarts its student does (progressive distillation's rounds).

        Loading into the module alone is not enough under ZeRO: the engine's optimizer updates its own fp32 master
        partitions and copies them back over the weights at the next step. So: at stage 3 the partitioned weights
        are gathered, loaded and re-partitioned (GatheredParameters with modifier_rank 0, which writes the new
        values into every rank's partition); at every stage the master partitions are then refreshed from the
        weights (the ZeRO optimizer's refresh_fp32_params). clear_optimizer: drop the optimizer's state (Adam's
        moments, SGD's momentum) as a fresh optimizer would have it; they are recreated at the next step."""
        engine = self.engines[name]
        net, opt = engine.module, engine.optimizer
        partitioned = [p for p in net.parameters() if hasattr(p, "ds_id")]
        if partitioned:
            import deepspeed

            with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=0):
                net.load_state_dict(state)
        else:
            net.load_state_dict(state)
        opt.refresh_fp32_params()
        if clear_optimizer:
            opt.optimizer.state.clear()  # the wrapped torch optimizer's, keyed by the master partitions

    def optimizer_step(self, optimizer, closure, model=None, **kwargs):
        model = model or self.lightning_module
        return self.precision_plugin.optimizer_step(optimizer, model=model, closure=closure, **kwargs)

    def grad_norm(self, name: str) -> float | None:
        """The gradient norm (before clipping) of the last step of network `name`'s engine."""
        norm = self.engines[name].get_global_grad_norm()
        return None if norm is None else float(norm)

    # --- checkpoints -------------------------------------------------------------------------------
    def _engine_keys(self, state: dict) -> set[str]:
        return {k for k in state for name in self.engines if k.startswith(name + ".")}

    def lightning_module_state_dict(self) -> dict[str, Any]:
        """The module's weights outside the engines (the engines save their own, sharded)."""
        state = self.lightning_module.state_dict()
        return {k: v for k, v in state.items() if k not in self._engine_keys(state)}

    def save_checkpoint(self, checkpoint: dict, filepath, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("storage_options is not supported by the multi-engine DeepSpeed strategy")
        target = Path(self.broadcast(str(filepath)))
        tmp = target.with_name(f".{target.name}.tmp")
        if self.is_global_zero:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.barrier("zero_checkpoint_mkdir")
        for name, engine in self.engines.items():
            engine.save_checkpoint(str(tmp / name), tag=ENGINE_TAG, exclude_frozen_parameters=False)
        if self.is_global_zero:
            rest = {k: v for k, v in checkpoint.items() if k != "optimizer_states"}
            rest["zero"] = {"engines": list(self.engines), "stage": self.config["zero_optimization"]["stage"],
                            "world_size": self.world_size}
            torch.save(rest, tmp / LIGHTNING_FILE)
        self.barrier("zero_checkpoint_written")
        if self.is_global_zero:
            if target.exists():
                shutil.rmtree(target) if target.is_dir() else target.unlink()
            os.replace(tmp, target)
        self.barrier("zero_checkpoint_renamed")

    def remove_checkpoint(self, filepath) -> None:
        if self.is_global_zero:
            path = Path(filepath)
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        return True  # the engines must exist to load their shards

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        path = Path(checkpoint_path)
        if not (path / LIGHTNING_FILE).is_file():
            raise ValueError(f"{path} is not a checkpoint of the multi-engine DeepSpeed strategy (no {LIGHTNING_FILE}); "
                             f"to start a ZeRO run from single-process weights, pass them as the method's "
                             f"initialisation (e.g. model.init_args.teacher) instead of --ckpt_path")
        rest = torch.load(path / LIGHTNING_FILE, map_location="cpu", weights_only=True)
        saved = rest.get("zero", {}).get("engines", [])
        if list(saved) != list(self.engines):
            raise ValueError(f"{path} holds engines {saved} but this run trains {list(self.engines)}; resume with "
                             f"the configuration that wrote it")
        fitting = self.lightning_module.trainer.state.fn == TrainerFn.FITTING
        for name, engine in self.engines.items():
            engine.load_checkpoint(str(path / name), tag=ENGINE_TAG, load_optimizer_states=fitting,
                                   load_lr_scheduler_states=False, load_module_strict=True)
        return rest

    def load_model_state_dict(self, checkpoint, strict: bool = True) -> None:
        """The weights outside the engines (the engines loaded theirs in load_checkpoint)."""
        module = self.lightning_module
        missing, unexpected = module.load_state_dict(checkpoint["state_dict"], strict=False)
        missing = set(missing) - self._engine_keys(dict.fromkeys(missing))
        if strict and (missing or unexpected):
            raise ValueError(f"checkpoint does not match the module: missing {sorted(missing)[:5]}, "
                             f"unexpected {sorted(unexpected)[:5]}")

    @property
    def lightning_restore_optimizer(self) -> bool:
        return False  # each engine restored its own optimizer state

    def load_optimizer_state_dict(self, checkpoint) -> None:
        pass

    @classmethod
    def register_strategies(cls, registry) -> None:
        registry.register(cls.strategy_name, cls, description="DeepSpeed ZeRO, one engine per trainable network")
        for stage in (1, 2, 3):
            registry.register(f"zero{stage}", cls, description=f"multi-engine DeepSpeed ZeRO stage {stage}",
                              stage=stage)
        registry.register("zero2_offload", cls, description="multi-engine ZeRO-2, optimizer states on CPU",
                          stage=2, offload_optimizer=True)
        registry.register("zero3_offload", cls, description="multi-engine ZeRO-3, optimizer states and weights on CPU",
                          stage=3, offload_optimizer=True, offload_parameters=True)


def _register() -> None:
    if MultiEngineDeepSpeed.strategy_name not in StrategyRegistry:
        MultiEngineDeepSpeed.register_strategies(StrategyRegistry)


_register()


# --- ZeRO checkpoint -> one state dict -------------------------------------------------------------
def is_zero_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / LIGHTNING_FILE).is_file()


def trainable_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """The trainable networks' full fp32 weights from a multi-engine ZeRO checkpoint directory, keyed as in
    the LightningModule's state dict (e.g. `generator.net.unet.conv_in.weight`). Works for any stage and
    world size, on one process, without the method's code."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    path = Path(path)
    rest = torch.load(path / LIGHTNING_FILE, map_location="cpu", weights_only=True)
    out: dict[str, Tensor] = {}
    for name in rest["zero"]["engines"]:
        state = get_fp32_state_dict_from_zero_checkpoint(str(path / name), tag=ENGINE_TAG)
        out.update({f"{name}.{k}": v for k, v in state.items()})
    return out


def convert_zero_checkpoint(path: str | os.PathLike, out: str | os.PathLike | None = None) -> dict:
    """A multi-engine ZeRO checkpoint directory as one plain Lightning checkpoint dict (and file, when `out`
    is given, written atomically): the engines' gathered weights merged with the rest, no optimizer state.
    `load_method`, `sample`, `evaluate` and `export` accept the result like any single-process checkpoint."""
    path = Path(path)
    rest = torch.load(path / LIGHTNING_FILE, map_location="cpu", weights_only=True)
    state = dict(rest["state_dict"])
    state.update(trainable_state_dict(path))
    ckpt = {k: v for k, v in rest.items() if k not in ("zero", "optimizer_states")}
    ckpt["state_dict"] = state
    if out is not None:
        out = Path(out)
        tmp = out.with_name(f".{out.name}.tmp")
        torch.save(ckpt, tmp)
        os.replace(tmp, out)
    return ckpt
