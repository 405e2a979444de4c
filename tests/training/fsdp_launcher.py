"""Test launcher: a script's own FSDP2 path on CPU processes (gloo).

Accelerate 1.16 switches to `DistributedType.FSDP` only for accelerator process groups: on a CPU-only machine
`accelerate launch --config_file configs/accelerate/fsdp2.yaml` starts the processes with the FSDP settings in the
environment, and each Accelerator quietly becomes a MULTI_CPU (DDP) run; its launcher refuses `--cpu` with
`--use_fsdp`. torch's `fully_shard` itself works on a CPU mesh over gloo. So this launcher runs a module or script
unchanged (the trainer, `benchmarks/training.py --fsdp`), except that every Accelerator it builds is switched to FSDP
right after construction, with the plugin those settings describe, as Accelerate itself would on GPUs:

    accelerate launch --config_file configs/accelerate/fsdp2.yaml --num_processes 2 \
        tests/training/fsdp_launcher.py -m franca_hf.cli pretrain --config demo run.output_dir=runs/fsdp

Runs killed at deterministic places (the trainer): `FRANCA_TEST_KILL_IN_STEP=<n>` SIGKILLs every process in optimizer
step n (after the update, before the EMA); `FRANCA_TEST_KILL_IN_CHECKPOINT=<n>` halfway through writing checkpoint n
(after the models, before the optimizer).
"""

import os
import signal
import sys

import accelerate
from accelerate import Accelerator, DistributedType, PartialState
from accelerate.utils import FullyShardedDataParallelPlugin

from franca_hf.training import networks


def force_fsdp2(accelerator: Accelerator) -> None:
    """Switch a MULTI_CPU Accelerator to FSDP2 with the plugin of the FSDP_* environment (`accelerate launch`)."""
    state = accelerator.state
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() != "true":
        raise SystemExit("fsdp_launcher: launch it with an FSDP Accelerate config (ACCELERATE_USE_FSDP is not set).")
    if state.distributed_type != DistributedType.MULTI_CPU:
        raise SystemExit(f"fsdp_launcher: expected a MULTI_CPU run to switch to FSDP, got {state.distributed_type}.")
    try:
        plugin = FullyShardedDataParallelPlugin()  # reads the FSDP_* variables, as Accelerator.__init__ does
        if state.mixed_precision != "no":
            plugin.set_mixed_precision(state.mixed_precision)
        state.fsdp_plugin = plugin
        state.distributed_type = DistributedType.FSDP
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        forced = accelerator.distributed_type == DistributedType.FSDP and accelerator.is_fsdp2
    except (AttributeError, KeyError, TypeError) as error:
        forced, reason = False, f"{type(error).__name__}: {error}"
    else:
        reason = f"distributed_type {accelerator.distributed_type}, is_fsdp2 {getattr(accelerator, 'is_fsdp2', None)}"
    if not forced:
        raise SystemExit(
            f"fsdp_launcher: Accelerate {accelerate.__version__} changed the internals this test launcher uses to "
            "force FSDP2 on CPU (AcceleratorState.distributed_type / fsdp_plugin, PartialState._shared_state, "
            f"FullyShardedDataParallelPlugin.set_mixed_precision): {reason}. Update tests/training/fsdp_launcher.py."
        )


def kill_in_checkpoint(accelerator: Accelerator, step: int) -> None:
    """SIGKILL every process once checkpoint `step`'s models are written and before its optimizer is."""
    save_optimizer = accelerate.accelerator.save_fsdp_optimizer

    def save_then_die(plugin, accel, optimizer, model, output_dir, *args, **kwargs):
        if os.path.basename(str(output_dir)) == f".step_{step:08d}.tmp":
            accelerator.wait_for_everyone()
            os.kill(os.getpid(), signal.SIGKILL)
        return save_optimizer(plugin, accel, optimizer, model, output_dir, *args, **kwargs)

    accelerate.accelerator.save_fsdp_optimizer = save_then_die


def kill_in_step(step: int) -> None:
    """SIGKILL every process in optimizer step `step` (1-based), after the update and before the teacher's EMA."""
    ema_update, calls = networks.ema_update, []

    def update_or_die(*args, **kwargs):
        calls.append(None)
        if len(calls) == step:
            os.kill(os.getpid(), signal.SIGKILL)
        return ema_update(*args, **kwargs)

    networks.ema_update = update_or_die  # before the trainer's module runs and imports it


def main(argv: list[str]) -> None:
    """`-m module args...` or `script.py args...`, run as `__main__` with every Accelerator forced to FSDP2; the process
    then ends with the run's exit status (`launching.run_then_exit`)."""
    from launching import run_then_exit  # (the launcher's own folder is first on sys.path when run as a script)

    build = Accelerator.__init__

    def build_then_force(accelerator, *args, **kwargs):
        build(accelerator, *args, **kwargs)
        force_fsdp2(accelerator)
        if os.environ.get("FRANCA_TEST_KILL_IN_CHECKPOINT"):
            kill_in_checkpoint(accelerator, int(os.environ["FRANCA_TEST_KILL_IN_CHECKPOINT"]))

    Accelerator.__init__ = build_then_force
    if os.environ.get("FRANCA_TEST_KILL_IN_STEP"):
        kill_in_step(int(os.environ["FRANCA_TEST_KILL_IN_STEP"]))
    run_then_exit(argv)  # a run that ends in finalization may abort in a gloo thread (see run_then_exit)


if __name__ == "__main__":
    main(sys.argv[1:])
