"""ovseg.callbacks.ThreadCountInvariance: every synthetic config of the demo trains to the same
weights, bit for bit, with 1 and 2 intra-op threads (and does not without the callback)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ovseg.callbacks import ThreadCountInvariance
from ovseg.cli import build
from ovseg.thread_invariance import (
    OneThreadConv2d,
    ThreadInvariantLayerNorm,
    intra_op_threads,
    make_convolutions_thread_invariant,
    make_layer_norms_thread_invariant,
)

CONFIGS = {
    "clip": ["-c", "configs/clip/synthetic.yaml", "--data.init_args.batch_size", "16"],
    "simzss": ["-c", "configs/simzss/synthetic.yaml"],
    "zegformer": ["-c", "configs/zegformer/synthetic.yaml", "-c", "configs/zegformer/random_clip.yaml"],
    "cdt": ["-c", "configs/cdt/synthetic.yaml", "-c", "configs/cdt/random_clip.yaml"],
}


def train_three_steps(
    args: list[str], threads: int, root, keep_callback: bool = True, onednn: bool = False
) -> dict[str, torch.Tensor]:
    """Three optimizer steps of a shipped config (its trainer: clipping, callbacks), ``threads``
    threads; ``onednn``: the callback's ``onednn_convolutions`` switch on."""
    mkldnn = torch.backends.mkldnn.enabled
    with intra_op_threads(threads):
        cli = build(
            [*args, "--trainer.max_steps", "3", "--trainer.limit_val_batches", "0", "--trainer.logger", "false"]
            + ["--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(root)]
        )
        if not keep_callback:
            cli.trainer.callbacks = [c for c in cli.trainer.callbacks if not isinstance(c, ThreadCountInvariance)]
        for callback in cli.trainer.callbacks:
            if isinstance(callback, ThreadCountInvariance):
                callback.onednn_convolutions = onednn
        classes = [type(m) for m in cli.model.modules()]
        cli.trainer.fit(cli.model, cli.datamodule)
        assert cli.trainer.global_step == 3
        assert torch.backends.mkldnn.enabled == mkldnn  # restored at teardown, as the LayerNorms' classes
        assert [type(m) for m in cli.model.modules()] == classes
        return {name: p.detach().clone() for name, p in cli.model.named_parameters()}


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_shipped_synthetic_config_trains_identically_with_one_and_two_threads(method, tmp_path):
    args = CONFIGS[method]
    one = train_three_steps(args, 1, tmp_path / "one")
    two = train_three_steps(args, 2, tmp_path / "two")
    assert one.keys() == two.keys()
    assert [name for name in one if not torch.equal(one[name], two[name])] == []
    # the control: without the callback, the same two runs already differ after three steps
    plain_one = train_three_steps(args, 1, tmp_path / "plain_one", keep_callback=False)
    plain_two = train_three_steps(args, 2, tmp_path / "plain_two", keep_callback=False)
    assert any(not torch.equal(plain_one[name], plain_two[name]) for name in plain_one)


@pytest.mark.parametrize("method", ["zegformer", "cdt"])
def test_onednn_convolutions_with_one_thread_each_train_identically_too(method, tmp_path):
    """``ThreadCountInvariance(onednn_convolutions=True)``: oneDNN stays on, every convolution runs
    with one thread, and the 1- and 2-thread runs still end with the same weights, bit for bit; the
    weights differ from the default's (oneDNN off), whose kernels round differently."""
    args = CONFIGS[method]
    one = train_three_steps(args, 1, tmp_path / "one", onednn=True)
    two = train_three_steps(args, 2, tmp_path / "two", onednn=True)
    assert [name for name in one if not torch.equal(one[name], two[name])] == []
    default = train_three_steps(args, 1, tmp_path / "default")
    assert any(not torch.equal(one[name], default[name]) for name in one)


@pytest.mark.skipif(not torch.backends.mkl.is_available(), reason="torch's CPU BLAS is not Intel MKL here")
def test_ovseg_puts_mkl_in_strict_mode_before_building_a_config_with_the_callback(tmp_path):
    """MKL fixes its reproducibility mode at its first call, and building a model already makes one,
    so ``ovseg`` calls ``ThreadCountInvariance.prepare_process`` before it builds anything (a fresh
    process, without the MKL_CBWR that conftest sets for the test process)."""
    import os
    import subprocess
    import sys

    script = (
        "import sys; from ovseg.cli import build; from ovseg.thread_invariance import mkl_is_strict; "
        "build(sys.argv[2:] + ['--trainer.logger', 'false', '--trainer.default_root_dir', sys.argv[1]]); "
        "print('strict' if mkl_is_strict() else 'not strict')"
    )
    env = {k: v for k, v in os.environ.items() if k != "MKL_CBWR"}
    outputs = {}
    for name, args in {"with": CONFIGS["cdt"], "without": ["-c", "configs/experiment/smoke.yaml"]}.items():
        done = subprocess.run(
            [sys.executable, "-c", script, str(tmp_path / name), *args], env=env, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr[-2000:]
        outputs[name] = done.stdout.strip().splitlines()[-1]
    assert outputs == {"with": "strict", "without": "not strict"}


@pytest.mark.parametrize("channels_first", [False, True])
def test_thread_invariant_layer_norms_match_torch_open_clip_and_timm_ones(channels_first):
    """Same outputs and gradients as the LayerNorm they replace (timm's LayerNorm2d normalises the
    channels of a (B, C, H, W) map); unknown subclasses are left alone and named."""
    import open_clip.transformer
    from timm.layers import LayerNorm2d

    torch.manual_seed(0)
    kinds = [LayerNorm2d] if channels_first else [nn.LayerNorm, open_clip.transformer.LayerNorm]
    for kind in kinds:
        reference = kind(24)
        with torch.no_grad():
            reference.weight.normal_()
            reference.bias.normal_()
        swapped = nn.Sequential(kind(24))
        swapped[0].load_state_dict(reference.state_dict())
        swap = make_layer_norms_thread_invariant(swapped)
        assert swap.unknown == [] and isinstance(swapped[0], ThreadInvariantLayerNorm)
        assert swapped[0].state_dict().keys() == reference.state_dict().keys()
        x = torch.randn(*((3, 24, 5, 7) if channels_first else (300, 24)), requires_grad=True)
        g = torch.randn_like(x)
        expected, got = reference(x), swapped(x)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
        expected.backward(g)
        grads = x.grad.clone(), reference.weight.grad.clone(), reference.bias.grad.clone()
        x.grad = None
        got.backward(g)
        for mine, theirs in zip((x.grad, swapped[0].weight.grad, swapped[0].bias.grad), grads):
            torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-4)
        swap.restore()  # its own class and forward again: the same output as the reference, to the bit
        assert type(swapped[0]) is kind and torch.equal(swapped(x), reference(x))


def test_unknown_layer_norm_subclasses_are_left_and_named():
    class ScaledLayerNorm(nn.LayerNorm):
        def forward(self, x):
            return 2 * super().forward(x)

    model = nn.Sequential(nn.LayerNorm(4), ScaledLayerNorm(4))
    assert make_layer_norms_thread_invariant(model).unknown == [f"1 ({__name__}.{ScaledLayerNorm.__qualname__})"]
    assert type(model[0]) is ThreadInvariantLayerNorm and type(model[1]) is ScaledLayerNorm


@pytest.mark.parametrize(
    "options",
    [
        {"kernel_size": 3, "padding": 1},
        {"kernel_size": 7, "stride": 2, "padding": 3, "bias": False},
        {"kernel_size": 3, "padding": "same", "dilation": 2, "groups": 2},
        {"kernel_size": 3, "padding": 1, "padding_mode": "reflect"},
        {"kernel_size": 1},
    ],
)
def test_one_thread_convolutions_match_torch_ones_with_one_thread_whatever_the_thread_count(options):
    """OneThreadConv2d computes what nn.Conv2d computes with one thread, forward and backward, to the
    bit, also in a process with two threads; its state dict is nn.Conv2d's, and restore() undoes it."""
    torch.manual_seed(0)
    reference = nn.Conv2d(8, 32, **options)
    model = nn.Sequential(nn.Conv2d(8, 32, **options))
    model[0].load_state_dict(reference.state_dict())
    x = torch.randn(16, 8, 40, 40)
    g = torch.randn_like(reference(x))

    def run(module, threads):
        with intra_op_threads(threads):
            module.zero_grad()
            inputs = x.clone().requires_grad_()
            out = module(inputs)
            assert torch.get_num_threads() == threads  # the one-thread block gave the count back
            out.backward(g)
            bias = [module.bias.grad] if module.bias is not None else []
            return [out.detach(), inputs.grad, module.weight.grad, *bias]

    expected = run(reference, 1)
    swap = make_convolutions_thread_invariant(model)
    assert swap.unknown == [] and type(model[0]) is OneThreadConv2d
    assert model[0].state_dict().keys() == reference.state_dict().keys()
    for threads in (1, 2):
        got = run(model[0], threads)
        assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True)), threads
    swap.restore()
    assert type(model[0]) is nn.Conv2d


def test_other_convolutions_are_left_and_named():
    model = nn.Sequential(nn.Conv2d(2, 2, 1), nn.Conv1d(2, 2, 1), nn.ConvTranspose2d(2, 2, 2))
    swap = make_convolutions_thread_invariant(model)
    assert swap.unknown == ["1 (torch.nn.modules.conv.Conv1d)", "2 (torch.nn.modules.conv.ConvTranspose2d)"]
    assert [type(m) for m in model] == [OneThreadConv2d, nn.Conv1d, nn.ConvTranspose2d]


def test_two_thread_convolutions_differ_without_the_swap():
    """The control: oneDNN's weight gradient of a convolution changes with the thread count here."""
    if not torch.backends.mkldnn.is_available():
        pytest.skip("torch without oneDNN")
    torch.manual_seed(0)
    conv = nn.Conv2d(64, 64, 3, padding=1)
    x = torch.randn(16, 64, 28, 28)
    grads = []
    for threads in (1, 2):
        with intra_op_threads(threads):
            conv.zero_grad()
            conv(x).square().sum().backward()
            grads.append(conv.weight.grad.clone())
    assert not torch.equal(*grads)
