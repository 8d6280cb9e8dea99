"""Which part of a training step depends on the number of intra-op threads?

    python scripts/diagnostics/thread_dependence.py -c configs/zegformer/synthetic.yaml \
        [--without-invariance] [--onednn-convolutions] [--no-mkldnn] [--time N] [OVSEG_OVERRIDES ...]

Builds the model and DataModule of the config (as ``ovseg fit`` would), takes one training batch and
runs the training loss forward and backward three times on it: with 1, 2 and again 1 thread(s),
each from the same RNG state. It prints the losses, the first modules (in execution order) whose
forward output differs between 1 and 2 threads, the leaf modules whose backward pass turns equal
gradients into different ones (the thread-dependent operations themselves; not available for
models that modify a module's output in place, e.g. timm's ResNet) and the parameters whose
gradients differ (bit for bit). The 1-vs-1 repeat checks that the step itself is deterministic.
A :class:`~ovseg.callbacks.ThreadCountInvariance` among the config's trainer callbacks (all four
synthetic configs of the demo have one) is applied to the model first, as ``ovseg fit`` does;
``--without-invariance`` leaves it out (and MKL out of strict mode), to see what it removes;
``--onednn-convolutions`` applies it with ``onednn_convolutions=True`` (oneDNN's convolutions with
one thread each, instead of oneDNN off).
``--no-mkldnn`` turns oneDNN off (``torch.backends.mkldnn.enabled = False``) for the whole
comparison; ``--time N`` also times N training steps (forward and backward) on one thread, to
weigh either.

Mask methods need the CLIP of configs/clip/synthetic.yaml; point the config at it as the demo does
(e.g. ``--model.init_args.checkpoint_path runs/demo/clip/open_clip.pt`` for CDT).
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections import Counter
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ovseg.callbacks import ThreadCountInvariance
from ovseg.cli import build
from ovseg.module import OVSegModule
from ovseg.thread_invariance import mkl_is_strict


def tensors_of(output: Any) -> list[Tensor]:
    """The tensors of a module's output (a tensor, a sequence or a mapping of them, else none)."""
    if isinstance(output, Tensor):
        return [output]
    if isinstance(output, Mapping):
        output = list(output.values())
    if isinstance(output, (list, tuple)):
        return [t for t in output if isinstance(t, Tensor)]
    return []


Step = tuple[dict[str, list[Tensor]], dict[str, tuple[list[Tensor], list[Tensor]]], dict[str, Tensor], float]


def one_step(model: OVSegModule, batch: Any, threads: int, watch_backward: bool = True) -> Step:
    """Forward outputs per module (execution order), per module the gradients flowing out of and
    into it in backward (leaf modules, backward order), parameter gradients and the loss of one step."""
    outputs: dict[str, list[Tensor]] = {}
    backward: dict[str, tuple[list[Tensor], list[Tensor]]] = {}

    def record(name: str):
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            outputs.setdefault(name, [t.detach().clone() for t in tensors_of(output)])

        return hook

    def record_backward(name: str):
        def hook(module: nn.Module, grad_input: Any, grad_output: Any) -> None:
            backward.setdefault(
                name, ([t.clone() for t in tensors_of(grad_output)], [t.clone() for t in tensors_of(grad_input)])
            )

        return hook

    handles = [m.register_forward_hook(record(n)) for n, m in model.named_modules() if n]
    leaves = [(n, m) for n, m in model.named_modules() if n and not list(m.children())]
    if watch_backward:
        handles += [m.register_full_backward_hook(record_backward(n)) for n, m in leaves]
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model.zero_grad(set_to_none=True)
    try:
        loss = model.training_loss(batch)["loss"]
        loss.backward()
    finally:
        for handle in handles:
            handle.remove()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return outputs, backward, grads, float(loss.detach())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", action="append", required=True, help="config file(s), merged in order")
    parser.add_argument(
        "--without-invariance", action="store_true", help="do not apply the config's ThreadCountInvariance callback"
    )
    parser.add_argument("--onednn-convolutions", action="store_true", help="the callback with onednn_convolutions=True")
    parser.add_argument("--no-mkldnn", action="store_true", help="turn oneDNN off for the comparison")
    parser.add_argument("--time", type=int, default=0, metavar="N", help="also time N training steps, 1 thread")
    args, overrides = parser.parse_known_args()
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    if args.no_mkldnn:
        torch.backends.mkldnn.enabled = False
    cli_args = [item for config in args.config for item in ("-c", config)] + overrides
    if args.without_invariance:  # MKL takes its mode at its first call: this one keeps it out of strict mode
        torch.ones(2, 2) @ torch.ones(2, 2)
    cli = build(cli_args)
    model, datamodule = cli.model, cli.datamodule
    invariance = [c for c in cli.trainer.callbacks if isinstance(c, ThreadCountInvariance)]
    if invariance and not args.without_invariance:
        invariance[0].onednn_convolutions = args.onednn_convolutions
        invariance[0].setup(cli.trainer, model, "fit")
    state = "not in the config" if not invariance else "left out" if args.without_invariance else "applied"
    mkl = {True: "strict", False: "not strict", None: "not torch's BLAS"}[mkl_is_strict()]
    print(f"ThreadCountInvariance: {state}; oneDNN {'on' if torch.backends.mkldnn.enabled else 'off'}; MKL {mkl}")
    datamodule.setup("fit")
    if hasattr(model, "set_training_classes"):
        model.set_training_classes(datamodule.training_classes)
    batch = next(iter(datamodule.train_dataloader()))
    model.train()
    for module in model.modules():  # backward hooks cannot watch in-place activations (same values)
        if isinstance(getattr(module, "inplace", None), bool):
            module.inplace = False
    watched = True
    try:
        one, two, again = (one_step(model, batch, threads) for threads in (1, 2, 1))
    except RuntimeError as error:  # e.g. timm's ResNet adds the shortcut in place to a hooked output
        if "BackwardHookFunction" not in str(error):
            raise
        print("(module backward hooks clash with an in-place op of this model: parameter gradients only)")
        watched = False
        one, two, again = (one_step(model, batch, threads, watch_backward=False) for threads in (1, 2, 1))
    print(f"loss: {one[3]!r} (1 thread), {two[3]!r} (2 threads), {again[3]!r} (1 thread, again)")
    repeat_same = all(torch.equal(one[2][n], again[2][n]) for n in one[2])
    print(f"1 thread twice: gradients {'identical' if repeat_same else 'DIFFER (the step is not deterministic)'}")
    modules = dict(model.named_modules())
    differing = []
    for name, outputs in one[0].items():
        pairs = [(a, b) for a, b in zip(outputs, two[0].get(name, [])) if a.shape == b.shape]
        if any(not torch.equal(a, b) for a, b in pairs):
            gap = max(float((a.double() - b.double()).abs().max()) for a, b in pairs)
            differing.append(f"  {name} ({type(modules[name]).__name__}): max |diff| {gap:.2e}")
    print(f"forward: {len(differing)} of {len(one[0])} module outputs differ between 1 and 2 threads")
    print("\n".join(differing[:5]) + ("\n  ..." if len(differing) > 5 else ""))
    if watched:
        sources = []  # leaf modules whose backward turns equal incoming gradients into different ones
        for name, (grad_out, grad_in) in one[1].items():
            other_out, other_in = two[1].get(name, ([], []))
            same_out = len(grad_out) == len(other_out) and all(torch.equal(a, b) for a, b in zip(grad_out, other_out))
            own = [p for p, _ in modules[name].named_parameters()]
            differs = any(not torch.equal(a, b) for a, b in zip(grad_in, other_in)) or any(
                not torch.equal(one[2][f"{name}.{p}"], two[2][f"{name}.{p}"]) for p in own if f"{name}.{p}" in one[2]
            )
            if same_out and differs:
                sources.append(f"  {name} ({type(modules[name]).__name__})")
        kinds = Counter(source.rsplit("(", 1)[1].rstrip(")") for source in sources)
        print(
            f"backward: {len(sources)} leaf modules get equal gradients from above and pass on different ones: "
            + ", ".join(f"{count} {kind}" for kind, count in kinds.most_common())
        )
        print("\n".join(sources[:8]) + ("\n  ..." if len(sources) > 8 else ""))
    grads = [n for n in one[2] if not torch.equal(one[2][n], two[2][n])]
    print(f"parameters: {len(grads)} of {len(one[2])} gradients differ between 1 and 2 threads")
    print("\n".join(f"  {n}" for n in grads[:6]) + ("\n  ..." if len(grads) > 6 else ""))

    if args.time > 0:
        print(
            f"1 thread: {seconds_per_step(model, batch, args.time):.3f} s per training step (forward, backward, "
            f"mean of {args.time} after one warm-up; oneDNN {'on' if torch.backends.mkldnn.enabled else 'off'})"
        )


def seconds_per_step(model: OVSegModule, batch: Any, steps: int) -> float:
    """Mean wall time of the training loss forward and backward on ``batch``, one thread."""
    torch.set_num_threads(1)
    times = []
    for _ in range(steps + 1):  # the first step warms up
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        model.training_loss(batch)["loss"].backward()
        times.append(time.perf_counter() - start)
    return sum(times[1:]) / steps


if __name__ == "__main__":
    main()
