"""The PyTorch fast paths compute what the reference computes: fused attention, device vote, whole loop,
published loop, and the GPU benchmark script's logic at tiny size (CPU). GPU-only checks skip here."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, fixture_dir, load_fixture_unet, read_json
from densepure_rt.export.checkpoints import load_strict
from densepure_rt.export.fast import (
    WholeLoop,
    device_majority_vote,
    published_loop,
    tune_for_speed,
    vote_histogram,
)
from densepure_rt.export.reference import reverse_run, to_diffusion_input
from densepure_rt.export.step import DenoiseStep
from densepure_rt.export.unet import AttentionBlock, create_model, set_attention
from densepure_rt.schedule import cosine_schedule, linear_schedule, reverse_schedule
from densepure_rt.stats.vote import majority_vote

needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (graph capture and the CUDA Philox generator)"
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Two OpenMP threads stall badly when the machine's other core is busy; one keeps this file fast.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------------
# Vote and histogram


@pytest.mark.parametrize("votes", [1, 2, 3, 4, 10])
def test_device_majority_vote_equals_official_tie_rule(votes):
    rng = np.random.default_rng(votes)
    rows = []
    for classes in (2, 3, 5, 1000):  # few classes: many ties
        rows.append(rng.integers(0, classes, size=(1500, votes)))
    labels = np.concatenate(rows)
    got = device_majority_vote(torch.from_numpy(labels).reshape(-1), votes)
    assert got.dtype == torch.int64
    np.testing.assert_array_equal(got.numpy(), majority_vote(labels))


def test_device_majority_vote_breaks_ties_by_first_vote():
    labels = torch.tensor([[3, 1, 1, 3], [5, 2, 2, 5], [7, 7, 8, 8], [0, 9, 9, 9]])
    assert device_majority_vote(labels.reshape(-1), 4).tolist() == [3, 5, 7, 9]


def test_vote_histogram_counts_every_label():
    voted = torch.tensor([0, 3, 3, 9, 3, 0])
    hist = vote_histogram(voted, 10)
    assert hist.dtype == torch.int64
    np.testing.assert_array_equal(hist.numpy(), np.bincount(voted.numpy(), minlength=10))


# --------------------------------------------------------------------------------------------------
# Fused attention


def _fixture_pair(name: str, new_order: bool = False):
    """The fixture UNet twice (matmul, sdpa); ``new_order`` reads the same weights with the other head order."""
    folder = fixture_dir(name)
    kwargs = dict(read_json(folder / "config.json")["create_model_kwargs"], use_new_attention_order=new_order)
    state = load_file(str(folder / "state_dict.safetensors"))
    models = []
    for impl in ("matmul", "sdpa"):
        model = create_model(**kwargs).eval()
        load_strict(model, state)
        models.append(set_attention(model, impl))
    return models


@pytest.mark.parametrize(
    "name, new_order",
    [("guided_diffusion_unet", False), ("improved_diffusion_unet", False), ("guided_diffusion_unet", True)],
)
def test_sdpa_attention_equals_matmul_attention_on_fixture_unets(name, new_order):
    matmul, sdpa = _fixture_pair(name, new_order)
    io = load_file(str(fixture_dir(name) / "io.safetensors"))
    x, t = io["x"][:2], io["t"][:2]
    with torch.no_grad():
        a, b = matmul(x, t), sdpa(x, t)
    assert (a - b).abs().max().item() < 1e-5
    if not new_order:  # the default path is the original's (pinned by test_unet.py too)
        assert (a - io["out"][:2]).abs().max().item() < 1e-4


@pytest.mark.parametrize("legacy", [True, False])
def test_sdpa_reads_the_same_head_order_as_matmul(legacy):
    torch.manual_seed(0)
    block = AttentionBlock(64, num_head_channels=16, legacy_order=legacy).eval()
    for p in block.parameters():
        p.data.normal_(0, 0.3)
    x = torch.randn(2, 64, 8, 8)
    with torch.no_grad():
        want = block(x)
        block.attention_impl = "sdpa"
        got = block(x)
        block.legacy_order = not legacy  # the other order gives another function: the check is sensitive
        other = block(x)
    assert (got - want).abs().max() < 1e-5
    assert (other - want).abs().max() > 1e-2


def test_set_attention_refuses_unknown_implementation():
    model, _ = load_fixture_unet("guided_diffusion_unet")
    with pytest.raises(ValueError, match="sdpa"):
        set_attention(model, "flash")


def test_tune_for_speed_in_fp32_keeps_the_function():
    model, _ = load_fixture_unet("guided_diffusion_unet")
    tuned, _ = load_fixture_unet("guided_diffusion_unet")
    classifier = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 5)).eval()
    tuned, wrapped = tune_for_speed(tuned, classifier, dtype=torch.float32, channels_last=True, sdpa=True)
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([10.0, 600.0])
    with torch.no_grad():
        assert (tuned(x, t) - model(x, t)).abs().max() < 1e-4
        assert torch.equal(wrapped(x), classifier(x))
    assert tuned.input_blocks[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    assert all(m.attention_impl == "sdpa" for m in tuned.modules() if isinstance(m, AttentionBlock))


def test_tune_for_speed_in_fp16_uses_the_original_fp16_mode():
    model, _ = load_fixture_unet("guided_diffusion_unet")
    tuned, _ = tune_for_speed(model, torch.nn.Identity(), dtype=torch.float16)
    assert tuned.use_fp16
    assert tuned.input_blocks[1][0].in_layers[2].weight.dtype == torch.float16
    assert tuned.time_embed[0].weight.dtype == torch.float32
    assert tuned.out[2].weight.dtype == torch.float32


# --------------------------------------------------------------------------------------------------
# The whole loop (eager, CPU) against the reference step by step

B, K, SIGMA, STEPS, CLASSES = 4, 3, 0.5, 3, 5


@pytest.fixture(scope="module")
def loop_run():
    """One WholeLoop call at small size, and the reference computed from its recorded draws."""
    unet, _ = load_fixture_unet("guided_diffusion_unet")
    torch.manual_seed(3)
    classifier = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, CLASSES)).eval()
    rs = reverse_schedule(linear_schedule(1000), SIGMA, STEPS)
    loop = WholeLoop(unet, classifier, rs, B, K, (3, 32, 32), CLASSES, seed=11)
    image = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(5))
    loop.load_image(image)
    loop.eager()
    with torch.no_grad():
        x_t = to_diffusion_input(image + SIGMA * loop.delta, rs).repeat_interleave(K, dim=0)
        purified = reverse_run(DenoiseStep(unet), x_t, rs, list(loop.noise))
        run_labels = classifier(purified).argmax(dim=1)
    voted = majority_vote(run_labels.reshape(B, K).numpy())
    ref = {"purified": purified, "run_labels": run_labels, "voted": voted, "counts": np.bincount(voted, minlength=CLASSES)}
    return loop, ref, rs


def test_whole_loop_eager_equals_reference_step_by_step(loop_run):
    loop, ref, _ = loop_run
    assert (loop.purified - ref["purified"]).abs().max().item() < 1e-5
    assert torch.equal(loop.run_labels, ref["run_labels"])
    np.testing.assert_array_equal(loop.voted.numpy(), ref["voted"])
    np.testing.assert_array_equal(loop.read_counts(), ref["counts"])


def test_whole_loop_draws_follow_the_documented_order(loop_run):
    loop, _, _ = loop_run
    g = torch.Generator().manual_seed(11)
    delta = torch.empty(B, 3, 32, 32).normal_(generator=g)
    noise = [torch.empty(B * K, 3, 32, 32).normal_(generator=g) for _ in range(STEPS)]
    assert torch.equal(loop.delta, delta)
    assert all(torch.equal(loop.noise[i], noise[i]) for i in range(STEPS))


def test_whole_loop_calls_draw_fresh_noise_and_accumulate_counts(loop_run):
    loop, ref, rs = loop_run
    first_delta = loop.delta.clone()
    before = loop.read_counts().copy()
    loop.eager()
    assert not torch.equal(loop.delta, first_delta)
    assert loop.read_counts().sum() == before.sum() + B
    # Re-seeding restarts the stream: the first call's draws and outputs come back.
    loop.seed(11)
    loop.reset_counts()
    loop.eager()
    assert torch.equal(loop.delta, first_delta)
    np.testing.assert_array_equal(loop.read_counts(), ref["counts"])
    with pytest.raises(ValueError, match="3 steps"):
        loop.set_schedule(reverse_schedule(linear_schedule(1000), SIGMA, 2))
    with pytest.raises(RuntimeError, match="CUDA"):
        loop.capture()


# --------------------------------------------------------------------------------------------------
# The published loop


@pytest.mark.parametrize(
    "name, schedule, sigma, steps",
    [("guided_diffusion_unet", linear_schedule(1000), 0.25, 2), ("improved_diffusion_unet", cosine_schedule(4000), 0.5, 3)],
)
def test_published_loop_equals_reverse_run_given_the_same_noise(name, schedule, sigma, steps):
    unet, _ = load_fixture_unet(name)
    rs = reverse_schedule(schedule, sigma, steps)
    g = torch.Generator().manual_seed(2)
    x_t = to_diffusion_input(torch.rand(2, 3, 32, 32, generator=g) + sigma * torch.randn(2, 3, 32, 32, generator=g), rs)
    noise = [torch.randn(2, 3, 32, 32, generator=g) for _ in range(rs.num_calls)]
    want = reverse_run(DenoiseStep(unet), x_t, rs, noise)
    got = published_loop(unet, x_t, rs, noise=noise)
    assert (got - want).abs().max().item() < 1e-5
    # Drawing from a generator instead: one standard-normal image batch per step, in step order.
    drawn = published_loop(unet, x_t, rs, generator=torch.Generator().manual_seed(9))
    g9 = torch.Generator().manual_seed(9)
    again = reverse_run(DenoiseStep(unet), x_t, rs, [torch.randn(x_t.shape, generator=g9) for _ in range(rs.num_calls)])
    assert (drawn - again).abs().max().item() < 1e-5


# --------------------------------------------------------------------------------------------------
# The benchmark script at tiny size on the CPU


@pytest.mark.slow
def test_gpu_bench_runs_on_cpu_at_tiny_size(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_bench.py"), "--quick", "--device", "cpu",
           "--preset", "tiny", "--threads", "1", "--out", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "pytorch_tiny_cpu.json").read_text())
    for key in ("device", "command", "date", "settings", "flop_floor", "paths", "numerics", "notes"):
        assert key in result
    assert result["device"]["torch"] == torch.__version__
    assert "--preset tiny" in result["command"]
    assert set(result["paths"]) == {"published", "tuned", "loop_eager"}  # no graph on the CPU
    assert any("graph path skipped" in note for note in result["notes"])
    pub, tuned = result["paths"]["published"], result["paths"]["tuned"]
    for entry in (pub, tuned):
        for key in ("unet_ms_per_sample", "step_ms_per_sample", "classifier_ms_per_sample", "gpu_s_per_image",
                    "floor_multiple", "speedup_vs_published"):
            assert entry[key] > 0, key
    assert pub["speedup_vs_published"] == pytest.approx(1.0)
    assert result["paths"]["loop_eager"]["ms_per_noisy_sample"] > 0
    floor = result["flop_floor"]
    assert floor["unet_gflop"] > 0 and floor["gpu_s_per_image"] > 0
    # GPU-seconds per image = (n0 + n) K (b step + classifier) / 1000.
    s = result["settings"]
    want = (s["n0"] + s["n"]) * s["votes"] * (s["steps"] * pub["step_ms_per_sample"] + pub["classifier_ms_per_sample"]) / 1e3
    assert pub["gpu_s_per_image"] == pytest.approx(want)
    numerics = result["numerics"]
    assert len(numerics["tuned_vs_fp32"]["trajectory_rel_l2"]) == result["run"]["steps"]
    assert max(numerics["tuned_vs_fp32"]["trajectory_rel_l2"]) < 1e-4  # fp32 tuned path on the CPU
    assert numerics["loop_vs_fp32"]["purified_rel_l2"] < 1e-4
    assert (tmp_path / "pytorch_summary_cpu.md").read_text().count("| published |") == 1
    assert "| published |" in done.stdout


# --------------------------------------------------------------------------------------------------
# GPU only


@pytest.mark.gpu
@needs_cuda
def test_graph_replay_reproduces_eager_draws_and_counts():
    unet, _ = load_fixture_unet("guided_diffusion_unet")
    unet = unet.cuda()
    torch.manual_seed(3)
    classifier = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, CLASSES)).eval().cuda()
    rs = reverse_schedule(linear_schedule(1000), SIGMA, STEPS)
    loop = WholeLoop(unet, classifier, rs, B, K, (3, 32, 32), CLASSES, device="cuda", seed=0)
    loop.load_image(torch.rand(3, 32, 32))
    loop.seed(5)
    eager = []
    for _ in range(2):
        loop.reset_counts()
        loop.eager()
        eager.append({k: getattr(loop, k).clone() for k in ("delta", "noise", "purified", "counts")})
    loop.capture()
    loop.seed(5)
    for r in range(2):
        loop.reset_counts()
        loop.replay()
        torch.cuda.synchronize()
        assert torch.equal(loop.delta, eager[r]["delta"]) and torch.equal(loop.noise, eager[r]["noise"])
        assert (loop.purified - eager[r]["purified"]).abs().max().item() < 1e-4
        assert torch.equal(loop.counts, eager[r]["counts"])
    # Eager calls and replays share one stream of draws.
    loop.seed(5)
    loop.replay()
    loop.eager()
    torch.cuda.synchronize()
    assert torch.equal(loop.delta, eager[1]["delta"])


@pytest.mark.gpu
@needs_cuda
def test_device_vote_and_histogram_capture_in_a_graph():
    labels = torch.randint(0, 3, (600,), device="cuda")
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        vote_histogram(device_majority_vote(labels, 6), 3)
    torch.cuda.current_stream().wait_stream(side)
    with torch.cuda.graph(graph):
        hist = vote_histogram(device_majority_vote(labels, 6), 3)
    labels.copy_(torch.randint(0, 3, (600,), device="cuda"))
    graph.replay()
    torch.cuda.synchronize()
    voted = majority_vote(labels.reshape(-1, 6).cpu().numpy())
    np.testing.assert_array_equal(hist.cpu().numpy(), np.bincount(voted, minlength=3))


@pytest.mark.gpu
@needs_cuda
def test_tuned_fp16_step_stays_close_to_fp32_on_the_gpu():
    ref, _ = load_fixture_unet("guided_diffusion_unet")
    tuned, _ = load_fixture_unet("guided_diffusion_unet")
    ref, tuned = ref.cuda(), tune_for_speed(tuned.cuda(), torch.nn.Identity())[0]
    rs = reverse_schedule(linear_schedule(1000), SIGMA, STEPS)
    x_t = torch.randn(8, 3, 32, 32, device="cuda")
    noise = [torch.randn_like(x_t) for _ in range(STEPS)]
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        want = reverse_run(DenoiseStep(ref), x_t, rs, noise)
        published = published_loop(ref, x_t, rs, noise=noise)
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    got = reverse_run(DenoiseStep(tuned), x_t, rs, noise)
    assert ((got - want).norm() / want.norm()).item() < 2e-2
    assert (published - want).abs().max().item() < 1e-4


@pytest.mark.gpu
@needs_cuda
def test_gpu_bench_runs_on_the_gpu_at_tiny_size(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_bench.py"), "--quick", "--device", "cuda",
           "--preset", "tiny", "--out", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (path,) = tmp_path.glob("pytorch_tiny_*.json")
    result = json.loads(path.read_text())
    assert {"published", "tuned", "loop_eager", "graph"} <= set(result["paths"])
    parity = result["numerics"]["graph_replay_vs_eager"]
    assert parity["draws_bitwise_equal"] and parity["counts_equal"] and parity["fresh_noise_each_replay"]
