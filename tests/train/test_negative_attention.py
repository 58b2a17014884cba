"""Negative guidance without CFG through the sampling recipes and the CLI, on the tiny SD 1.5 folder: with NASA (SNOOPI,
arXiv 2412.02687) a one-step DMD generator and a w-input student sample with a negative prompt at one network
evaluation per step, the samples differ from those without and equal a manual processor swap, alpha 0 is the model
unchanged; with NegToMe (arXiv 2412.01339) each batch's first sample is unchanged and the others move; recipes and
networks they cannot apply to are refused in one line."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from models.nasa_attention import negative_away_attention
from tests.train.text_fits import PROMPTS
from train.cli import main
from train.methods.negative_attention import NASASampling, NegToMeSampling, nasa_recipe, negtome_recipe
from train.methods.sampling import GeneratorSampling, GuidedSampling, WInputSampling

NEG = "a red car"


def _counted(module):
    """The module's sampling network with a counter of its forward calls."""
    net, calls = module.sampling_denoiser().net, []
    net.register_forward_hook(lambda *a: calls.append(1))
    return net, calls


@pytest.mark.parametrize("method, steps", [("dmd", None), ("gd", 2), ("lcm", 2)],
                         ids=["generator", "w_input", "consistency"])
def test_nasa_samples_with_one_evaluation_per_step_and_equals_a_manual_swap(t2i_workspace, method, steps):
    from train.runtime.checkpoint import load_method

    module = load_method(t2i_workspace.fitted(method, "sd15"))
    net, calls = _counted(module)
    plain, nfe_plain = module.generate(PROMPTS, steps=steps, seed=3)
    calls.clear()
    nasa, nfe = module.generate(PROMPTS, steps=steps, seed=3, negative=NEG, nasa_scale=2.0)
    assert nfe == nfe_plain == (steps or 1) and len(calls) == (steps or 1)  # one evaluation per step, batched prompts
    assert (nasa - plain).abs().max() > 1e-3  # the negative prompt changed the samples
    neg = module.encode([NEG] * len(PROMPTS))["encoder_hidden_states"]
    with negative_away_attention(net, neg, 2.0):
        manual, _ = module.generate(PROMPTS, steps=steps, seed=3)
    assert torch.equal(manual, nasa)
    zero, _ = module.generate(PROMPTS, steps=steps, seed=3, negative=NEG, nasa_scale=0.0)
    assert torch.equal(zero, plain)
    assert all(type(m.processor).__name__ != "NegativeAwaySteerAttention" for m in net.modules()
               if hasattr(m, "processor"))  # restored after sampling


def test_the_cli_samples_a_generator_with_a_negative_prompt(t2i_workspace, tmp_path, capsys):
    ckpt = str(t2i_workspace.fitted("dmd", "sd15"))
    base = ["sample", "--ckpt", ckpt, "--prompt", "a cat", "--num-per-prompt", "2"]
    main(base + ["--out", str(tmp_path / "plain")])
    main(base + ["--negative-prompt", NEG, "--nasa-scale", "2", "--out", str(tmp_path / "nasa")])
    plain, nasa = (np.load(tmp_path / k / "samples.npz") for k in ("plain", "nasa"))
    assert float(nasa["nfe_per_sample"]) == 1.0 and np.abs(nasa["images"] - plain["images"]).max() > 1e-3
    for extra, needle in [(["--nasa-scale", "2"], "give one with --negative-prompt"),
                          (["--negative-prompt", NEG], "works with --nasa-scale ALPHA"),
                          (["--negative-prompt", NEG, "--nasa-scale", "-1"], "alpha must be a finite value >= 0")]:
        with pytest.raises(SystemExit) as e:
            main(base + extra + ["--out", str(tmp_path / "refused")])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and len(err.splitlines()) == 1 and needle in err, err
    assert not (tmp_path / "refused").exists()


def test_recipes_and_networks_nasa_cannot_apply_to_are_refused(t2i_workspace):
    from models.adapters import ClassConditionalUNet
    from train.runtime.checkpoint import load_method

    text_net = load_method(t2i_workspace.fitted("dmd", "sd15")).sampling_denoiser().net
    generator = GeneratorSampling(lambda z, c, gen: z, steps=1, scale=2.0)
    assert isinstance(nasa_recipe(generator, text_net, 1.0), NASASampling)
    assert nasa_recipe(WInputSampling(lambda: None), text_net, 1.0).resolve(negative=True).guider == "conditional"
    with pytest.raises(ValueError, match="not recipe 'cfg'; give its negative prompt with --negative-prompt alone"):
        nasa_recipe(GuidedSampling(lambda: None), text_net, 1.0)
    digits = ClassConditionalUNet(num_classes=10, sample_size=8, in_channels=1, block_out_channels=[16, 32],
                                  attention_levels=[False, True], layers_per_block=1, norm_num_groups=8)
    with pytest.raises(ValueError, match="this class-label model has none \\(its class enters through a class embedding"):
        nasa_recipe(generator, digits, 1.0)
    sd3 = load_method(t2i_workspace.fitted("dmd", "sd3")).sampling_denoiser().net
    with pytest.raises(ValueError, match="SD3/Flux attend to text through joint attention"):
        nasa_recipe(generator, sd3, 1.0)


@pytest.mark.parametrize("method, steps", [("dmd", None), ("gd", 2)], ids=["generator", "w_input"])
def test_negtome_keeps_the_first_sample_and_moves_the_others(t2i_workspace, method, steps):
    from train.runtime.checkpoint import load_method

    module = load_method(t2i_workspace.fitted(method, "sd15"))
    net, calls = _counted(module)
    prompts = ["a cat", "the dog", "a cat"]
    plain, _ = module.generate(prompts, steps=steps, seed=3)
    calls.clear()
    merged, nfe = module.generate(prompts, steps=steps, seed=3, negtome_scale=0.9)
    assert nfe == (steps or 1) and len(calls) == (steps or 1)
    assert torch.equal(merged[0], plain[0]) and (merged[1:] - plain[1:]).abs().amax((1, 2, 3)).min() > 1e-3
    both, nfe = module.generate(prompts, steps=steps, seed=3, negative=NEG, nasa_scale=2.0, negtome_scale=0.9)
    nasa, _ = module.generate(prompts, steps=steps, seed=3, negative=NEG, nasa_scale=2.0)
    assert nfe == (steps or 1) and torch.equal(both[0], nasa[0]) and (both[1:] - nasa[1:]).abs().max() > 1e-3
    assert not net._forward_pre_hooks and all(type(m.processor).__name__ not in ("NegToMeSelfAttention",
                                                  "NegativeAwaySteerAttention") for m in net.modules()
                                              if hasattr(m, "processor"))  # restored after sampling


def test_the_cli_samples_a_generator_with_negtome(t2i_workspace, tmp_path, capsys):
    ckpt = str(t2i_workspace.fitted("dmd", "sd15"))
    base = ["sample", "--ckpt", ckpt, "--prompt", "a cat", "--num-per-prompt", "3"]
    main(base + ["--out", str(tmp_path / "plain")])
    main(base + ["--negtome-scale", "0.9", "--out", str(tmp_path / "negtome")])
    plain, merged = (np.load(tmp_path / k / "samples.npz")["images"] for k in ("plain", "negtome"))
    assert np.array_equal(merged[0], plain[0]) and np.abs(merged[1:] - plain[1:]).max() > 1e-3
    with pytest.raises(SystemExit):
        main(base + ["--negtome-scale", "-1", "--out", str(tmp_path / "refused")])
    assert "alpha must be a finite value >= 0" in capsys.readouterr().err


def test_negtome_is_refused_where_it_cannot_apply(t2i_workspace):
    from train.runtime.checkpoint import load_method

    text_net = load_method(t2i_workspace.fitted("dmd", "sd15")).sampling_denoiser().net
    generator = GeneratorSampling(lambda z, c, gen: z, steps=1, scale=2.0)
    assert isinstance(negtome_recipe(generator, text_net, 0.9), NegToMeSampling)
    with pytest.raises(ValueError, match="--negtome-scale is for models sampled with one evaluation per step"):
        negtome_recipe(GuidedSampling(lambda: None), text_net, 0.9)
    sd3 = load_method(t2i_workspace.fitted("dmd", "sd3")).sampling_denoiser().net
    with pytest.raises(ValueError, match="needs UNet self-attention layers; SD3Transformer has none"):
        negtome_recipe(generator, sd3, 0.9)
