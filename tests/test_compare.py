"""benchmarks/compare_guidance.py: the table's paired differences against hand-computed values, and the resumable,
incremental driver (a finished cell is never recomputed, a failed one is named and retried next time)."""
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import compare_guidance as cg  # noqa: E402
from conftest import refused  # noqa: E402


def fake_cell(variant, seed, ari_fg, ran_on="CPU (x86_64, 2 cores)"):
    vae = {"reconstruction_mse": {"recon1": 0.02, "recon2": 0.03}, "separability": {"inter_cluster": 0.5,
                                                                                     "intra_cluster": 0.1},
           "codebook_usage": {"perplexity1_0": 40.0, "used1_0": 0.9, "perplexity1_1": 60.0, "used1_1": 0.8}}
    metrics = {"ari": 0.5, "ari_fg": ari_fg, "miou": 0.4, "mbo": 0.45, "miou_small": 0.1, "miou_medium": 0.3,
               "miou_large": 0.5}
    return {"variant": variant, "decoder": "transformer", "seed": seed, "vae_steps": 400, "ocl_steps": 3200,
            "metrics": metrics, "vae": vae, "minutes": {"vae": 1.0, "ocl": 2.0}, "threads": 1, "jobs": 1,
            "ran_on": ran_on, "machine": "m", "commit": "abc"}


def write(folder, cell):
    path = folder / f"{cell['variant']}__{cell['decoder']}__s{cell['seed']}.json"
    path.write_text(json.dumps(cell))


def row(text, variant):
    line = next(line for line in text.splitlines() if line.startswith(f"| transformer | {variant} |"))
    return [c.strip() for c in line.strip("|").split("|")]  # decoder, guidance, seeds, ARI, ARIfg, ...


def test_table_pairs_seed_by_seed(tmp_path):
    # baseline 0.50 / 0.60 / 0.40, msf 0.55 / 0.62 / 0.47 -> differences 5, 2, 7 points: mean 4.67, std 2.52
    for seed, (base, ours) in enumerate([(0.50, 0.55), (0.60, 0.62), (0.40, 0.47)]):
        write(tmp_path, fake_cell("vqvae+stab", seed, base))
        write(tmp_path, fake_cell("msf", seed, ours, ran_on="NVIDIA H200"))
    write(tmp_path, fake_cell("msf-N2", 1, 0.52))  # one seed: paired with seed 1 only (0.52 - 0.60, 0.52 - 0.62)
    text = cg.table(tmp_path)
    msf, base, n2 = row(text, "msf"), row(text, "vqvae+stab"), row(text, "msf-N2")
    # 95% interval: 4.67 +- t(0.975, 2) 4.3027 * 2.5166 / sqrt(3) = 4.67 +- 6.25 -> [-1.58, +10.92]
    assert msf[2] == "3" and msf[4] == "54.67 +- 7.51" and msf[8] == "+4.67 [-1.58, +10.92] (3)" and msf[9] == "-"
    assert base[8] == "-" and base[9] == "-4.67 [-10.92, +1.58] (3)"
    assert n2[8] == "-8.00 (1)" and n2[9] == "-10.00 (1)"
    assert msf[5] == "3 of 3, 54.67" and n2[5] == "1 of 1, 52.00"  # all bound (ARIfg >= 45)
    assert msf[10] == "0.0200" and msf[11] == "50.0 / 0.80"  # scale-1 MSE; mean perplexity / smallest share used
    assert msf[-1] == "H200" and base[-1] == "CPU"
    comparison = next(line for line in text.splitlines() if line.startswith("| transformer: msf - vqvae+stab |"))
    # +-2.5 would take 7 pairs: 6 give 2.5706 * 2.5166 / sqrt(6) = 2.64, 7 give 2.4469 * 2.5166 / sqrt(7) = 2.33
    assert "| 3 of 3 | not settled | 7 (has 3) |" in comparison


def test_video_cells_add_arifg_after_the_first_frame_and_take_the_video_recipe(tmp_path, monkeypatch):
    """shapes_video cells (STEVE): ARIfg_1+ beside the whole-clip ARIfg, mean +- std by hand; the budget of a
    --dataset shapes_video invocation is the video preset's (400 VAE steps, 6,000 STEVE steps), not the image one's."""
    for seed, later in enumerate([0.30, 0.40, 0.50]):
        cell = fake_cell("msf", seed, 0.6)
        cell["metrics"]["ari_fg_later"] = later
        write(tmp_path, cell)
    text = cg.table(tmp_path)
    assert "| ARIfg_1+ | mIoU |" in text and row(text, "msf")[6] == "40.00 +- 10.00"
    budgets = []
    monkeypatch.setattr(cg, "cells", lambda a: budgets.append((a.vae_steps, a.ocl_steps["transformer"],
                                                                 a.ocl_steps["diffusion"])) or [])  # no training
    for dataset, flags in (("shapes_video", []), ("shapes", []), ("shapes", ["--ocl-steps", "50"])):
        cg.main(["--dataset", dataset, "--results", str(tmp_path / dataset), "--work", str(tmp_path / "w"), *flags])
    # shapes: SlotDiffusion's recipe trains 4,800 steps, SLATE 3,200; --ocl-steps sets both
    assert budgets == [(400, 6000, 6000), (400, 3200, 4800), (400, 50, 50)]
    # the table's budget line names each decoder's steps where they differ
    (tmp_path / "mixed").mkdir()
    write(tmp_path / "mixed", {**fake_cell("msf", 0, 0.6), "decoder": "diffusion", "ocl_steps": 4800})
    write(tmp_path / "mixed", fake_cell("msf", 0, 0.6))
    assert "OCL diffusion 4800 steps, transformer 3200 steps;" in cg.table(tmp_path / "mixed")
    assert "OCL 3200 steps;" in cg.table(tmp_path)
    with pytest.raises(SystemExit, match="--decoders slate: unknown; one or more of transformer, diffusion, mlp"):
        cg.main(["--decoders", "transformer,slate", "--results", str(tmp_path), "--work", str(tmp_path / "w")])


def test_finished_cells_are_never_recomputed_and_failures_are_retried(tmp_path, monkeypatch):
    results, work = tmp_path / "results", tmp_path / "work"
    results.mkdir()
    write(results, fake_cell("msf", 0, 0.6))  # finished earlier
    calls = []

    def run_cell(args, name, decoder, seed):
        calls.append((name, seed))
        if name == "gdr" and len(calls) == 1:  # fails the first time only
            raise cg.Failed(f"failed (1): train_ocl.py ...; see {work}/x.log")
        return {**fake_cell(name, seed, 0.5), "decoder": decoder}

    monkeypatch.setattr(cg, "run_cell", run_cell)
    monkeypatch.setattr(cg, "where", lambda device: "CPU")
    argv = ["--cells", "msf,gdr", "--decoders", "transformer", "--seeds", "0", "--results", str(results), "--work",
            str(work), "--jobs", "2"]
    with pytest.raises(SystemExit, match="1 cell\\(s\\) failed"):
        cg.main(argv)
    assert calls == [("gdr", 0)] and not (results / "gdr__transformer__s0.json").exists()
    cg.main(argv)  # the next invocation retries the failed cell only
    assert calls == [("gdr", 0), ("gdr", 0)] and (results / "gdr__transformer__s0.json").exists()
    assert json.loads((results / "msf__transformer__s0.json").read_text())["metrics"]["ari_fg"] == 0.6
    assert "| transformer | gdr | 1 |" in (results / "table.md").read_text()
    cg.main(argv)  # nothing left to do
    assert len(calls) == 2


def test_main_table_before_ablations_and_diffusion_only_on_the_papers_rows():
    args = cg.argparse.Namespace(cells="all", seeds=[0, 1], decoders=["transformer", "diffusion"])
    order = cg.cells(args)
    first_ablation = next(i for i, c in enumerate(order) if c[0] in cg.ABLATIONS)
    assert all(c[0] in cg.MAIN for c in order[:first_ablation])
    assert all(c[0] in cg.ABLATIONS for c in order[first_ablation:])
    assert {c[0] for c in order if c[1] == "diffusion"} == set(cg.DIFFUSION)
    assert len(order) == 2 * (len(cg.MAIN) + len(cg.DIFFUSION)) + 2 * len(cg.ABLATIONS)


def test_variants_of_slotdiffusions_target_run_only_under_the_diffusion_decoder():
    args = cg.argparse.Namespace(cells="msf,msf-z-scale1", seeds=[0], decoders=["mlp", "diffusion"])
    assert cg.cells(args) == [("msf", "mlp", 0), ("msf", "diffusion", 0), ("msf-z-scale1", "diffusion", 0)]


def test_plain_rows_are_the_published_decoder_paired_against_their_own_baseline(tmp_path):
    """`--cells plain`: SlotDiffusion's published decoder on the three guidances, under diffusion only, each with
    flags that train_ocl parses to eps without the gate; a -plain row's paired differences are against
    vqvae+stab-plain and msf-plain, not against the recipe's rows."""
    import train_ocl
    args = cg.argparse.Namespace(cells="plain", seeds=[0], decoders=["transformer", "diffusion"])
    assert cg.cells(args) == [(n, "diffusion", 0) for n in cg.PLAIN]
    for name in cg.PLAIN + ["msf-z", "msf-scale1", "msf-z-scale1"]:
        a = train_ocl.parse_args(["--decoder", "diffusion", *cg.VARIANTS[name][1]])
        assert (a.diffusion_prediction, a.mask_gate) == ("eps", False), name
    # recipe rows: base 0.20, msf 0.30; plain rows: base 0.10, msf 0.25 -> msf-plain pairs to +15, not to +5
    for variant, ari_fg in (("vqvae+stab", 0.20), ("msf", 0.30), ("vqvae+stab-plain", 0.10), ("msf-plain", 0.25)):
        write(tmp_path, fake_cell(variant, 0, ari_fg))
    text = cg.table(tmp_path)
    assert row(text, "msf-plain")[8] == "+15.00 (1)" and row(text, "msf-plain")[9] == "-"
    assert row(text, "msf")[8] == "+10.00 (1)" and row(text, "vqvae+stab-plain")[8] == "-"


def slate_step_gflop_by_hand():
    """One training step of the SLATE + MSF paper row for one 128-px COCO image, counted by hand from the
    architecture (2 FLOPs per multiply-add; trained layers 3x their forward: forward, input and weight gradients;
    a trained layer whose input needs no gradient 2x; frozen parts their forward alone)."""
    P, s, d = 128 * 128, 11, 256  # pixels (the naive CNN runs at stride 1), slots (10 objects + 1), slot width
    mac = {}
    # naive CNN: conv 3->64 5x5 (2x), three 64->64 5x5 convs, the position map 4->64 (2x), the MLP 64->64->256
    mac["cnn"] = 2 * P * 64 * 3 * 25 + 3 * 3 * P * 64 * 64 * 25 + 2 * P * 4 * 64 + 3 * P * (64 * 64 + 64 * d)
    # big-little: DINO ViT-S/8 frozen, patch embedding and 12 blocks of 257 tokens x 384 (qkv, proj, 4x MLP,
    # q.k and attn.v); its 3x3 projection 384 -> 64 on the 16x16 map (2x)
    n, c = 16 * 16 + 1, 384
    mac["dino"] = 256 * c * 3 * 64 + 12 * (n * c * 12 * c + 2 * n * n * c) + 2 * 256 * 64 * c * 9
    # Slot Attention: keys and values of the 16,384 inputs once; 3 iterations of q, q.k, attn.v, GRU (6 d^2), MLP
    mac["slots"] = 3 * (2 * P * d * d + 3 * (s * d * d + 2 * s * P * d + 6 * s * d * d + 4 * s * d * d))
    # SLATE's decoder on 32x32 = 1,024 tokens of 256, 4 layers: self-attention (4 T d^2 and 2 T^2 d), cross-attention
    # (2 T d^2, the slots' keys and values, 2 T s d), MLP (8 T d^2); the embedding of X, two 64-way classifiers
    T = 32 * 32
    layer = 14 * T * d * d + 2 * T * T * d + 2 * s * d * d + 2 * T * s * d
    mac["decoder"] = 3 * (4 * layer + T * d * d + 2 * T * d * 64)
    # the frozen MSF VAE at 128, 64, 32 px: encoder convs 3->32 4x4/2, 32->64 4x4/2, four 64->64 3x3, 64->256 1x1;
    # W's two projections and the matching of 4 candidates against codebooks of 64
    mac["vae"] = sum((H // 2) ** 2 * 32 * 3 * 16 + (H // 4) ** 2 * (64 * 32 * 16 + 4 * 64 * 64 * 9 + 64 * 256 +
                                                                    2 * 256 * 512 + 4 * 64 * 256) for H in (128, 64, 32))
    return 2 * sum(mac.values()) / 1e9  # about 97.3


def test_paper_scale_counts_the_slate_rows_flops_within_ten_percent_of_a_hand_count():
    """benchmarks/paper_scale.py on the SLATE + MSF row at batch 1 (the model as train_ocl.py builds it at the
    paper's settings): its FLOPs of a training step within 10% of the hand count, attention included (torch's
    counter would count the CPU attention kernel as 0: 13% of this step); the loader line; Sect. 3.4's codebook
    parameters of stage 1."""
    import paper_scale
    row = paper_scale.measure("slate", torch.device("cpu"), steps=1, batch_scale=1 / 32)
    assert row["batch"] == 1 and row["stage"] == 2 and row["paper_steps"] == 50_000
    hand = slate_step_gflop_by_hand()
    assert abs(row["gflops_step"] / hand - 1) < 0.10, (row["gflops_step"], hand)
    assert row["params_trained"] > 0 and row["peak_gib"] > 0 and row["s_step"] > 0
    loader = paper_scale.loader_rate("images", 0, batch=2, batches=2)  # samples/s of 128 px records, decoded
    text = paper_scale.table([row], None, {"images": {0: loader}})
    assert "peak process memory, fp32 (GiB)" in text and f"0 workers {loader:,.0f} samples/s" in text
    stage1 = paper_scale.measure("msf", torch.device("cpu"), steps=1, batch_scale=1 / 64)
    assert stage1["codebook_params"] == 2 ** 17 + 2 ** 16  # Sect. 3.4: projection c x 2c, 4 codebooks of 64 x 256


def test_size_spread_pairs_each_spread_seed_by_seed_and_draws_the_gain(tmp_path, capsys):
    """Per spread the ARIfg of each guidance, then MSF - vqvae+stab, MSF - GDR and GDR - vqvae+stab over the seeds
    both rows have, with their 95% intervals by hand; a spread without cells has no row."""
    import size_spread
    from PIL import Image
    for folder, cells in (("sides24-24", {"vqvae+stab": [0.50, 0.60], "msf": [0.52, 0.59, 0.99]}),
                          ("sides3-60", {"vqvae+stab": [0.50, 0.60, 0.40], "gdr": [0.52, 0.61, 0.45],
                                         "msf": [0.55, 0.62, 0.47], "msf-N2": [0.9]})):
        (tmp_path / folder).mkdir()
        for variant, values in cells.items():
            for seed, v in enumerate(values):
                write(tmp_path / folder, fake_cell(variant, seed, v))
    size_spread.main(["--table", "--results", str(tmp_path)])
    text = (tmp_path / "table.md").read_text()
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith("| ") and ":" in line.split("|")[1]}
    # 1x: msf - vqvae+stab over seeds 0, 1 (seed 2 has no pair): +2, -1; half-width 12.706 * 2.121 / sqrt(2) = 19.06
    assert rows["1x: msf - vqvae+stab"][1:] == ["2 (0,1)", "0.50 +- 2.12", "+0.50 [-18.56, +19.56]", "1 of 2",
                                                "not settled", "6 (has 2)", "+2.00, -1.00"]
    assert "1x: msf - gdr" not in rows  # no GDR cells there
    # 20x: msf - gdr 3, 1, 2 -> 2 +- 4.3027 / sqrt(3) = [-0.48, +4.48]; msf - vqvae+stab 5, 2, 7 -> [-1.58, +10.92]
    assert rows["20x: msf - gdr"][3:6] == ["+2.00 [-0.48, +4.48]", "3 of 3", "not settled"]
    assert rows["20x: msf - vqvae+stab"][3] == "+4.67 [-1.58, +10.92]"
    assert rows["20x: gdr - vqvae+stab"][3] == "+2.67 [-2.50, +7.84]"  # 2, 1, 5: std 2.08
    spread = next(line for line in text.splitlines() if line.startswith("| 3 to 60"))
    assert "| 50.00 +- 10.00 (3) | 52.67 +- 8.02 (3) | 54.67 +- 7.51 (3) |" in spread
    assert "10.00 +- 0.00 / 30.00 +- 0.00 / 50.00 +- 0.00" in spread  # mIoU S / M / L, x100
    assert "| 6 to 48" not in text
    assert Image.open(tmp_path / "gain.png").size == (460, 300)
    assert "| 24 to 24" in capsys.readouterr().out


def test_size_spread_runs_seed_major_through_compare_guidance(tmp_path, monkeypatch, capsys):
    import size_spread
    built, calls = [], []
    monkeypatch.setattr(size_spread, "build_dataset", lambda root, sides: built.append(sides) or root / f"{sides}")
    monkeypatch.setattr(size_spread.compare_guidance, "main", lambda argv: calls.append(argv))
    size_spread.main(["--seeds", "0,1", "--results", str(tmp_path / "r"), "--work", str(tmp_path / "w"),
                      "--data-root", str(tmp_path / "d")])
    order = [(c[c.index("--seeds") + 1], Path(c[c.index("--results") + 1]).name) for c in calls]
    assert order == [("0", "sides24-24"), ("0", "sides6-48"), ("0", "sides3-60"),
                     ("1", "sides24-24"), ("1", "sides6-48"), ("1", "sides3-60")]
    assert all(c[c.index("--cells") + 1] == "vqvae+stab,gdr,msf" and c[c.index("--decoders") + 1] == "transformer"
               for c in calls)
    assert (tmp_path / "r" / "table.md").read_text() == "(no cells yet)\n"
    with refused(capsys, r"--seeds 'zero': give seeds as integers separated by commas"):
        size_spread.main(["--seeds", "zero", "--table"])


def test_a_resumed_run_counts_the_minutes_of_every_process(tmp_path, monkeypatch):
    """metrics.jsonl's "time" restarts at 0 in each process of a run: an interrupted run's earlier processes (here
    100 s and 50 s by hand) are added to the wall time of the process that finishes it; a finished run counts 0."""
    out = tmp_path / "ocl"
    out.mkdir()
    lines = [(1, 0.5), (200, 60.0), (400, 100.0), (401, 0.4), (600, 50.0), (601, 0.3)]
    (out / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "time": t}) + "\n" for s, t in lines))
    assert cg.logged_seconds(out / "metrics.jsonl") == pytest.approx(100.0 + 50.0 + 0.3)
    assert cg.logged_seconds(tmp_path / "none.jsonl") == 0.0
    torch.save({"step": 601}, out / "last.pt")
    calls = []
    monkeypatch.setattr(cg, "run", lambda argv, log, threads: calls.append(argv))
    seconds = cg.train("train_ocl.py", out, [], 800, 1)
    assert "--resume" in calls[0] and 150.3 <= seconds < 151.3  # the earlier 150.3 s + this (instant) process
    assert cg.train("train_ocl.py", out, [], 601, 1) == 0.0 and len(calls) == 1  # already finished: not rerun
    early = tmp_path / "early"  # stopped before its first checkpoint: only a log line, nothing to resume
    early.mkdir()
    (early / "metrics.jsonl").write_text(json.dumps({"step": 1, "time": 2.0}) + "\n")
    cg.train("train_ocl.py", early, [], 800, 1)
    assert "--overwrite" in calls[1] and "--resume" not in calls[1]


def test_statistics_against_hand_computed_values():
    """benchmarks/stats.py: Student's t quantiles from the printed table, a paired difference, its interval and
    verdict, the seeds a comparison would take, and the binding rate, each computed by hand."""
    import stats
    assert stats.t_quantile(3) == pytest.approx(4.3027, abs=1e-4)  # 2 degrees of freedom
    assert stats.t_quantile(10) == pytest.approx(2.2622, abs=1e-4)  # 9
    # differences 4, 5, 6 (seed 3 has no partner): mean 5, std 1, half-width 4.3027 / sqrt(3) = 2.4841
    r = stats.paired({0: 5.0, 1: 6.0, 2: 7.0, 3: 9.0}, {0: 1.0, 1: 1.0, 2: 1.0})
    assert r["seeds"] == [0, 1, 2] and r["diffs"] == [4.0, 5.0, 6.0] and r["mean"] == 5.0 and r["std"] == 1.0
    assert r["half"] == pytest.approx(2.4841, abs=1e-4) and r["verdict"] == "ahead" and r["ahead"] == 3
    assert stats.interval(r) == "+5.00 [+2.52, +7.48]"
    r = stats.paired({0: 1.0, 1: 2.0}, {0: 2.0, 1: 4.0})  # -1, -2: mean -1.5, std 0.7071, half 12.706 * 0.5 = 6.35
    assert r["verdict"] == "not settled" and r["low"] == pytest.approx(-7.853, abs=1e-3)
    assert stats.paired({0: 1.0, 1: 1.5, 2: 2.0}, {0: 2.0, 1: 2.6, 2: 3.0})["verdict"] == "behind"
    one = stats.paired({0: 1.0}, {0: 3.0})
    assert one["n"] == 1 and one["verdict"] == "not settled" and one["half"] != one["half"]  # NaN: no interval
    # std 3.37: 9 pairs give 2.3060 * 3.37 / 3 = 2.590 > 2.5, 10 give 2.2622 * 3.37 / 3.1623 = 2.411
    assert stats.seeds_needed(3.37) == 10 and stats.seeds_needed(float("nan")) is None
    assert stats.binding([50.0, 44.9, 45.0]) == (2, 3, 47.5) and stats.binding([10.0])[:2] == (0, 1)


def test_table_gives_a_recipes_test_seeds_rows_of_their_own(tmp_path):
    """SlotDiffusion's `shapes` recipe was chosen on seeds 0-2: MSF 30, 40 and GDR 20, 20 there (differences 10, 20:
    mean 15), MSF 50 against GDR 45 at the test seed 3 (+5). The seed-3 cells are rows "msf (test)" and "gdr (test)",
    paired only with each other, never averaged into the choosing rows; SLATE on `shapes` (no recipe chosen on seeds)
    keeps seed 3 in its one row, and a STEVE cell from before cells named their dataset is told by its clip metric."""
    diffusion = lambda v, s, a: {**fake_cell(v, s, a), "decoder": "diffusion", "dataset": "shapes"}  # noqa: E731
    for seed, (m, g) in ((0, (0.30, 0.20)), (1, (0.40, 0.20)), (3, (0.50, 0.45))):
        write(tmp_path, diffusion("msf", seed, m))
        write(tmp_path, diffusion("gdr", seed, g))
        write(tmp_path, {**fake_cell("msf", seed, m), "dataset": "shapes"})
    text = cg.table(tmp_path)
    line = lambda v: next(x for x in text.splitlines() if x.startswith(f"| diffusion | {v} |")).split(" | ")  # noqa
    assert line("msf")[2:5] == ["2", "50.00 +- 0.00", "35.00 +- 7.07"]  # seeds, ARI, ARIfg
    assert line("msf (test)")[2:5] == ["1", "50.00", "50.00"]
    assert line("gdr")[9] == "-15.00 [-78.53, +48.53] (2)" and line("gdr (test)")[9] == "-5.00 (1)"
    assert row(text, "msf")[2] == "3"  # SLATE: seeds 0, 1, 3 in one row
    assert "| diffusion: msf - gdr | 2 (0,1) |" in text and "| diffusion: msf (test) - gdr (test) | 1 (3) |" in text
    assert "Rows named (test) hold the seeds a recipe was not chosen on (seeds 3)" in text
    video = fake_cell("msf", 4, 0.6)
    video["metrics"]["ari_fg_later"] = 0.6
    assert cg.part(video) == cg.TEST and cg.part({**video, "seed": 2}) == ""


def test_headline_pairs_cells_of_one_folder_and_counts_binding(tmp_path, monkeypatch):
    """benchmarks/headline.py reads the cells on disk: MSF 60, 62, 64 against GDR 55, 58, 58 (differences 5, 4, 6 by
    hand: mean 5, 95% interval 5 +- 2.48) and GDR binds on 3 of 3 with mean 57.00."""
    import headline
    folder = tmp_path / "compare_shapes"
    folder.mkdir()
    for seed, (m, g) in enumerate([(0.60, 0.55), (0.62, 0.58), (0.64, 0.58)]):
        write(folder, fake_cell("msf", seed, m))
        write(folder, fake_cell("gdr", seed, g))
    monkeypatch.setattr(headline, "R", tmp_path)
    text = headline.table()
    line = next(x for x in text.splitlines() if x.startswith("| SLATE: MSF - GDR"))
    assert "+5.00 [+2.52, +7.48]" in line and "| 3 of 3 | ahead |" in line
    assert "| SLATE: gdr | 3 of 3 | 57.00 |" in text and "SlotDiffusion" not in text  # no cells, no row


def test_headline_counts_a_recipes_test_seeds_apart(tmp_path, monkeypatch):
    """STEVE's recipe was chosen on seeds 0-2: MSF 40 and 60 there, 30 at the test seed 3, so the binding rows read 1 of
    2 (mean 60.00) and 0 of 1, never 1 of 3; and the test seed is paired only in its own comparison."""
    import headline
    folder = tmp_path / "compare_shapes_video"
    folder.mkdir()
    for seed, (m, g) in enumerate([(0.40, 0.35), (0.60, 0.50)]):
        write(folder, fake_cell("msf", seed, m))
        write(folder, fake_cell("gdr", seed, g))
    write(folder, fake_cell("msf", 3, 0.30))
    write(folder, fake_cell("gdr", 3, 0.20))
    monkeypatch.setattr(headline, "R", tmp_path)
    text = headline.table()
    assert "| STEVE, seeds 0-2: msf | 1 of 2 | 60.00 |" in text and "| STEVE, seeds 3-5: msf | 0 of 1 | - |" in text
    assert "| STEVE, seeds 0-2: MSF - GDR | 2 (0,1) |" in text and "| STEVE, seeds 3-5 (the test): MSF - GDR | 1 (3) |" in text


def test_compile_speed_takes_the_rate_after_the_compiling_steps():
    """benchmarks/compile_speed.py: steps 1 (slow: it compiles) and 25, 50, 100 logged at 30 s, 40 s, 45 s, 55 s;
    from step 25 on: (55 - 40) / (100 - 25) = 0.2 s per step by hand; validation lines carry no loss and are skipped."""
    import compile_speed
    log = [{"step": 1, "time": 30.0, "loss": 9.0}, {"step": 25, "time": 40.0, "loss": 5.0},
           {"step": 50, "time": 45.0, "loss": 4.0}, {"step": 100, "time": 55.0, "loss": 3.0},
           {"step": 100, "time": 58.0, "val_ari_fg": 0.5}]
    assert compile_speed.s_per_step(log, 25) == pytest.approx(0.2)


def test_slate_loss_layouts_give_one_loss(capsys):
    """benchmarks/slate_loss.py: the decoder's token-major loss equals image-shaped cross-entropy over the code-major
    view (2 groups, a 3 x 5 grid: a mixed-up height and width would pair tokens with other indices), and the
    benchmark prints one row per guidance with its ratio."""
    import decoders
    import slate_loss
    g = torch.Generator().manual_seed(1)
    logits = [[torch.randn(2, 15, 6, generator=g), torch.randn(2, 15, 9, generator=g)]]  # (b, h*w, m) per group
    indices = [torch.stack([torch.randint(0, 6, (2, 3, 5), generator=g), torch.randint(0, 9, (2, 3, 5), generator=g)], 1)]
    token = decoders.TransformerDecoder.loss(logits, indices).item()
    assert slate_loss.code_major_loss(logits, indices, [(3, 5)]).item() == pytest.approx(token, rel=1e-6)
    slate_loss.main(["--repeats", "1", "--batch-size", "2", "--grid", "4"])
    out = capsys.readouterr().out
    assert "| MSF (two groups) | 64/64 |" in out and "| VQ-VAE | 4096 |" in out
