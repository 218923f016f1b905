"""The fast defaults of `training/train_diffae.py` keep the official training loss.

The loss is checked on the official parity fixture (`ema.train_loss_mse`: the unmodified official
`training_losses` on fixed x0, t and noise), with every precision the defaults can pick. Speed itself is measured by
benchmarks/bench_vs_official.py, not here.
"""

import copy

import pytest
import torch
from diffusers import DDPMScheduler
from safetensors.torch import load_file

import _common
import _models
import train_diffae
from diffusers_diffae import precision
from diffusers_diffae.convert import convert_official_checkpoint


# Largest relative difference per image from the official fp32 loss: fp32 differs only by summation order; bf16
# autocast (fp32 weights, GroupNorm statistics and loss in fp32) measured 1.5e-4 on this fixture.
LOSS_TOLERANCE = {None: 1e-5, "no": 1e-5, "bf16": 2e-3}


@pytest.fixture(scope="module")
def fixture(official_dir):
    pipe = convert_official_checkpoint(official_dir / "last.ckpt", official_dir / "config.json", use_ema=True)
    inputs = load_file(official_dir / "inputs.safetensors")
    official_loss = load_file(official_dir / "outputs.safetensors")["ema.train_loss_mse"]
    return pipe, inputs, official_loss


def default_args(*options):
    return train_diffae.parse_args(["--train_data_dir", ".", "--resolution", "32", *map(str, options)])


@pytest.mark.parametrize("native_bf16", [True, False])
def test_default_precision_follows_the_hardware(monkeypatch, native_bf16):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native_bf16)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_args().mixed_precision == ("bf16" if native_bf16 else None)
    assert default_args("--mixed_precision", "no").mixed_precision == "no"  # an explicit choice always wins
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert default_args().mixed_precision is None  # on a GPU: accelerate's configured default


@pytest.mark.parametrize("native_bf16", [True, False])
def test_default_training_loss_matches_the_official_loss(fixture, monkeypatch, native_bf16):
    """The per-image loss of the training module, in the layout and precision the defaults pick on a CPU with and
    without native bf16, against the official code's loss on the same batch."""
    pipe, inputs, official_loss = fixture
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native_bf16)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = default_args()
    unet, encoder = copy.deepcopy(pipe.unet), copy.deepcopy(pipe.encoder)
    memory_format = _models.prepare_for_training(args, [unet, encoder])
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    module = train_diffae.DiffAETrainingModule(unet, encoder, noise_scheduler).eval()  # no dropout, as the fixture
    x0, noise = (inputs[k].contiguous(memory_format=memory_format) for k in ("x0", "noise"))
    with torch.no_grad(), _models.training_autocast(args.mixed_precision, x0.device):
        loss = module(x0, inputs["t"], noise)
    assert loss.dtype == torch.float32
    relative = ((loss - official_loss).abs() / official_loss).max().item()
    assert relative <= LOSS_TOLERANCE[args.mixed_precision], (args.mixed_precision, relative)
    if args.mixed_precision == "bf16":
        assert relative > 0  # autocast really ran in bf16 (an fp32 run matches to ~1e-7)


def test_optimizer_is_fused_and_takes_the_same_adam_step():
    """The fused Adam of `make_optimizer` moves the weights as torch's per-parameter Adam, up to fp32 rounding."""
    torch.manual_seed(0)
    weights = [torch.randn(64, 32), torch.randn(32)]
    grads = [torch.randn_like(w) for w in weights]
    results = []
    for fused in (True, False):
        params = [torch.nn.Parameter(w.clone()) for w in weights]
        args = default_args()
        optimizer = _common.make_optimizer(args, params, 1e-3) if fused else torch.optim.Adam(params, lr=1e-3)
        assert optimizer.defaults.get("fused") is (True if fused else None)
        for _ in range(3):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            optimizer.step()
        results.append(params)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


@pytest.mark.parametrize("warmup", [False, True])
def test_lerp_ema_takes_the_same_step_as_diffusers_ema(warmup):
    """`make_ema`'s one-pass `LerpEMAModel` follows diffusers' `EMAModel` (same decay schedule, frozen weights
    copied) up to fp32 rounding, over steps where the weights move."""
    from diffusers.training_utils import EMAModel

    import _checkpoints
    from diffusers_diffae.training_utils import LerpEMAModel

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.Linear(16, 4))
    model[1].bias.requires_grad_(False)
    model.config = {}  # what make_ema hands EMAModel for saving
    args = default_args("--use_ema", "--ema_decay", "0.9", *(["--ema_warmup"] if warmup else []))
    ema = _checkpoints.make_ema(args, model, type(model), "cpu")
    assert type(ema) is LerpEMAModel and ema.foreach
    schedule = {k: getattr(ema, k) for k in ("decay", "min_decay", "use_ema_warmup", "inv_gamma", "power")}
    reference = EMAModel(model.parameters(), foreach=True, **schedule)
    for _ in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.step(model.parameters())
        reference.step(model.parameters())
        assert ema.cur_decay_value == reference.cur_decay_value
    assert ema.optimization_step == reference.optimization_step == 5
    for ours, theirs, p in zip(ema.shadow_params, reference.shadow_params, model.parameters()):
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-6)
        assert not torch.equal(ours, p) or not p.requires_grad  # averaged, not copied
    assert torch.equal(ema.shadow_params[-1], model[1].bias)  # a frozen weight is copied


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_group_norm32_normalises_bf16_input_in_fp32(memory_format):
    """GroupNorm32 on bf16 input with fp32 parameters, through the mixed-precision CPU kernel (contiguous input) or
    its casts (channels-last): the fp32 group norm rounded to bf16, and the same gradients, up to one bf16 rounding."""
    from diffusers_diffae.models.blocks import normalization

    torch.manual_seed(0)
    norm = normalization(64)
    with torch.no_grad():
        norm.weight.normal_(1, 0.5)
        norm.bias.normal_()
    x = torch.randn(2, 64, 8, 8).mul_(3).add_(1).bfloat16().contiguous(memory_format=memory_format).requires_grad_()
    grad = torch.randn(2, 64, 8, 8).bfloat16()
    y = norm(x)
    assert y.dtype == torch.bfloat16
    x32 = x.detach().float().requires_grad_()
    reference = torch.nn.functional.group_norm(x32, 32, norm.weight, norm.bias, 1e-5)
    torch.testing.assert_close(y.float(), reference.bfloat16().float(), atol=0.02, rtol=0.01)
    (gx,) = torch.autograd.grad(y, x, grad)
    (gx_reference,) = torch.autograd.grad(reference, x32, grad.float())
    torch.testing.assert_close(gx.float(), gx_reference, atol=0.02, rtol=0.01)
