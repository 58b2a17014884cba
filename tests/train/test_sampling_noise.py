"""Every random draw on the sampling path works with the CPU generators sampling seeds, whatever device the samples
are on (no GPU needed): the recipes' own draws (a consistency model's re-noising, a few-step generator's) run on the
meta device under tests/guidance/test_noise.py's strict generators, and no file of the sampling path draws with a
generator on another device than the generator's."""
from __future__ import annotations

import ast
from pathlib import Path

import torch

from guidance.denoiser import Denoiser
from guidance.schedules import VPCosine
from tests.guidance.test_noise import META, Halve, strict_generators  # noqa: F401 (a fixture)
from train.methods.onestep_generator import GeneratorChain
from train.methods.sampling import ConsistencySampling, Settings

ROOT = Path(__file__).resolve().parents[2]
# what `sample` and `evaluate` run: the samplers and guiders, the recipes, generate, the evaluation and the commands
SAMPLING_PATH = ["guidance/samplers.py", "guidance/guided.py", "guidance/guiders/*.py", "guidance/denoiser.py",
                 "train/methods/sampling.py", "train/methods/base.py", "train/methods/onestep_generator.py",
                 "train/methods/negative_attention.py", "models/vae.py", "models/text_to_image.py",
                 "models/*_attention.py", "models/w_embedding.py", "train/evaluation/*.py",
                 "train/sampling_commands.py"]
DRAWS = {"randn", "rand", "randint", "randn_like", "rand_like", "randint_like", "normal", "randperm", "multinomial",
         "bernoulli", "normal_", "uniform_", "random_", "exponential_"}


def _mismatched_draws(path: Path) -> list[str]:
    """Draws in `path` that pass a generator and a device= that is not read from that generator (`g.device...`)."""
    bad = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Call):
            continue
        name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        kw = {k.arg: k.value for k in node.keywords if k.arg}
        if name in DRAWS and "generator" in kw and "device" in kw:
            gen = ast.unparse(kw["generator"])
            if not ast.unparse(kw["device"]).startswith(f"{gen}.device"):
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
    return bad


def test_no_sampling_draw_uses_a_generator_on_another_device():
    files = sorted({f for pattern in SAMPLING_PATH for f in ROOT.glob(pattern)})
    assert len(files) > 20
    bad = [line for f in files for line in _mismatched_draws(f)]
    assert not bad, "draw on the generator's device (guidance.noise.standard_normal):\n" + "\n".join(bad)


def test_the_scan_finds_the_draw_it_forbids(tmp_path):
    f = ROOT / "tests" / "train" / "_draw_probe.py"
    try:
        f.write_text("import torch\nz = torch.randn(3, generator=g, device=x.device)\n"
                     "ok = torch.rand(3, generator=g, device=g.device if g else x.device)\n")
        assert [line.split(": ", 1)[1] for line in _mismatched_draws(f)] == [
            "torch.randn(3, generator=g, device=x.device)"]
    finally:
        f.unlink()


def test_a_consistency_models_renoising_draws_on_the_generators_device(strict_generators):  # noqa: F811
    den = Denoiser(Halve(), VPCosine(), "eps")
    recipe = ConsistencySampling(lambda: den, solver_steps=4, default_steps=3, w_input=False)
    on_cpu = recipe.times
    recipe.times = lambda steps, device=None: on_cpu(steps).to(device)  # the grid's search reads values: CPU
    noise = torch.zeros(2, 1, 4, 4, device=META)
    x, nfe = recipe.run(noise, torch.zeros(2, device=META), None, Settings(None, 3, "consistency"),
                        torch.Generator().manual_seed(0))
    assert x.device == META and nfe == 3


class _Chain(GeneratorChain):
    generator_steps = 2
    generator_times = torch.tensor([0.98, 0.5])


def test_a_few_step_generators_renoising_draws_on_the_generators_device(strict_generators):  # noqa: F811
    den = Denoiser(Halve(), VPCosine(), "eps")
    z = torch.zeros(2, 1, 4, 4, device=META)
    x = _Chain().run_generator(den, z, torch.zeros(2, device=META), generator=torch.Generator().manual_seed(0))
    assert x.device == META and x.shape == z.shape
