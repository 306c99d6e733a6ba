"""EXERCISES.md stays true to the code and to itself, read as a student would run it: every command parses with its
script's own argument parser; every exercise's commands are complete (its own --out for every stage it runs, its
stage 2 reading its own VAE when it changes stage 1, every evaluate.py scoring a checkpoint that its own commands
wrote, never the baseline's or another exercise's, except the shipped baseline where the exercise changes evaluation
only); no run instruction is prose only; every `# EXERCISE:` tag stands in the code at one place and belongs to one
exercise; and the shipped baseline checkpoints still score the digits written beside them.

Run: python -m pytest -q tests/test_exercises.py
"""
import json
import re
import shlex
import sys
from pathlib import Path

import pytest

import data
import evaluate
import train_ocl
import train_vae

ROOT = Path(__file__).resolve().parents[1]
TEXT = (ROOT / "EXERCISES.md").read_text()
sys.path.insert(0, str(ROOT / "benchmarks"))
import exercises as bench  # noqa: E402  (benchmarks/exercises.py)

PARSERS = {"train_vae.py": train_vae.parse_args, "train_ocl.py": train_ocl.parse_args, "evaluate.py": evaluate.parse_args,
           "benchmarks/exercises.py": bench.parse_args}
STAGE_1 = {"vae.py", "msf.py", "train_vae.py"}  # a tag in one of these changes the VAE: the exercise trains its own
SHIPPED = ROOT / "exercises" / "baseline"
SHIPPED_VAE, SHIPPED_OCL = "exercises/baseline/vae.pt", "exercises/baseline/ocl.pt"
CODE = {p.name: p.read_text() for p in ROOT.glob("*.py")}


def sections():
    """[(number, text)] of the `## N. Title` sections."""
    parts = re.split(r"\n## (\d+)\. ", TEXT)
    return [(int(parts[i]), parts[i + 1]) for i in range(1, len(parts), 2)]


def commands(text):
    """Every `python <script> ...` line of the code blocks of `text`, as argument lists."""
    blocks = re.findall(r"```\n(.*?)```", text, flags=re.S)
    return [shlex.split(line)[1:] for block in blocks for line in block.splitlines() if line.startswith("python ")]


def flag(argv, name):
    return argv[argv.index(name) + 1] if name in argv else None


def tag_file(text):
    """The file holding the `# EXERCISE:` tag that an exercise's **Where.** names."""
    tag = re.search(r"`# EXERCISE: ([\w-]+)`", text).group(1)
    places = [name for name, code in CODE.items() if re.search(rf"# EXERCISE: {re.escape(tag)}\b", code)]
    assert len(places) == 1, (tag, places)
    return places[0]


def test_there_are_eight_to_twelve_exercises_each_with_its_parts():
    found = sections()
    assert 8 <= len(found) <= 12 and [n for n, _ in found] == list(range(1, len(found) + 1))
    for n, text in found:
        for part in ("**Question.**", "**Where.**", "**Run**", "**Look at.**", "**What we measured.**"):
            assert part in text, (n, part)
        assert "MEASURED_" not in text, n  # every measurement filled in


def test_every_command_parses():
    found = commands(TEXT)
    assert len(found) >= 20
    for script, *argv in found:
        PARSERS[script](argv)  # raises SystemExit on a flag that does not exist or a bad value


def test_no_run_instruction_is_prose_only():
    """Between **Run** and its code block: no command in the text ("the baseline's commands with --out ..." is how
    a student ends up scoring another run)."""
    for n, text in sections():
        run = text[text.index("**Run**"):text.index("**Look at.**")]
        assert "```" in run, (n, "no code block under **Run**")
        prose = run[:run.index("```")]
        assert "`python " not in prose and "--out" not in prose and "commands with" not in prose, (n, prose)


def test_every_exercise_runs_and_scores_its_own_runs():
    for n, text in sections():
        argvs = commands(text[text.index("**Run**"):text.index("**Look at.**")])
        trains = [a for a in argvs if a[0] in ("train_vae.py", "train_ocl.py")]
        outs = [flag(a, "--out") for a in trains]
        assert all(outs) and len(set(outs)) == len(outs), (n, "every training command needs its own --out", outs)
        assert all(o.startswith(f"runs/ex{n}/") for o in outs), (n, "runs of an exercise go to runs/exN/", outs)
        written = {f"{o}/{f}" for o in outs for f in ("best.pt", "last.pt")}
        vaes = {f"{flag(a, '--out')}/best.pt" for a in trains if a[0] == "train_vae.py"}
        where = tag_file(text)
        assert vaes or where not in STAGE_1, (n, f"the change is in {where} (stage 1), but no VAE is trained")
        for a in trains:
            if a[0] == "train_ocl.py":  # its own VAE if it trained one, else the shipped baseline's
                assert flag(a, "--vae-ckpt") in (vaes or {SHIPPED_VAE}), (n, a)
        scored = [flag(a, "--ckpt") for a in argvs if a[0] == "evaluate.py"]
        assert scored, (n, "nothing is scored")
        for ckpt in scored:
            assert ckpt in written or (where == "evaluate.py" and ckpt == SHIPPED_OCL), (n, ckpt, written)


def test_every_tag_in_the_code_belongs_to_one_exercise():
    named = [re.search(r"`# EXERCISE: ([\w-]+)`", text).group(1) for _, text in sections()]
    assert len(named) == len(set(named))
    in_code = set(re.findall(r"# EXERCISE: ([\w-]+)", "\n".join(CODE.values())))
    assert in_code == set(named), in_code ^ set(named)
    for n, text in sections():
        assert f"(EXERCISES.md {n})" in "\n".join(line for code in CODE.values() for line in code.splitlines()
                                                  if f"# EXERCISE: {named[n - 1]} " in line), (n, named[n - 1])


def test_every_solution_applies_to_the_code_and_changes_its_exercises_tag():
    """The teacher's patches (exercises/solutions/NN-<tag>.patch) apply to the code as it is, and each changes the
    file holding its own exercise's tag, within a few lines of it: a change to the code that moves the place
    breaks this, not the class."""
    import subprocess
    patches = sorted((ROOT / "exercises" / "solutions").glob("*.patch"))
    assert len(patches) >= 5
    named = dict(sections())
    for patch in patches:
        n, tag = int(patch.name[:2]), patch.stem[3:]
        assert f"`# EXERCISE: {tag}`" in named[n], (patch.name, "names another exercise's tag")
        done = subprocess.run(["git", "apply", "--check", str(patch)], cwd=ROOT, capture_output=True, text=True)
        assert done.returncode == 0, (patch.name, done.stderr)
        where = tag_file(named[n])
        hunks = re.findall(rf"^\+\+\+ b/{re.escape(where)}\n@@ -(\d+)", patch.read_text(), flags=re.M)
        line = next(i for i, code in enumerate(CODE[where].splitlines(), 1) if f"# EXERCISE: {tag} " in code)
        assert hunks and abs(int(hunks[0]) + 3 - line) <= 10, (patch.name, where, hunks, line)


def test_every_solution_applies_and_comes_off_on_a_clean_tree(tmp_path):
    """As EXERCISES.md tells a teacher: on a clean copy of the repository, `git apply` of each solution changes the
    files its patch names and nothing else, and `git apply -R` leaves the tree clean again."""
    import shutil
    import subprocess

    def git(*argv):
        done = subprocess.run(["git", *argv], cwd=tmp_path, capture_output=True, text=True)
        assert done.returncode == 0, (argv, done.stderr)
        return done.stdout
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.splitlines()
    for f in tracked:
        if (ROOT / f).is_file() and not f.startswith(("results/", "exercises/baseline/")):
            (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, tmp_path / f)
    git("init", "-q")
    git("add", "-A")
    git("-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "clean")
    for patch in sorted((ROOT / "exercises" / "solutions").glob("*.patch")):
        named = set(re.findall(r"^\+\+\+ b/(\S+)", patch.read_text(), flags=re.M))
        git("apply", str(patch))
        changed = {line[3:] for line in git("status", "--porcelain").splitlines()}
        assert changed == named, (patch.name, changed)
        git("apply", "-R", str(patch))
        assert git("status", "--porcelain") == "", patch.name


@pytest.fixture(scope="module")
def first_64_val(tmp_path_factory):
    """The first 64 images of shapes' val split (sample i does not depend on the split's size)."""
    root = tmp_path_factory.mktemp("data")
    data.write_shapes(root, 64, counts={"train": 2, "val": 64}, quiet=True)
    return root


@pytest.mark.parametrize("name", ["vae.pt", "ocl.pt"])
def test_the_shipped_baseline_scores_the_digits_written_beside_it(name, first_64_val):
    """A change to the model code that silently changes what the shipped checkpoints compute fails here (rebuild them
    with the command in EXERCISES.md's baseline and `python benchmarks/exercises.py --ship`). The tolerance covers
    the float rounding of another CPU, not a changed model."""
    expected = json.loads((SHIPPED / "expected.json").read_text())[name]
    got = evaluate.main(["--ckpt", str(SHIPPED / name), "--data-root", str(first_64_val), "--limit", "64"])
    if name == "ocl.pt":
        for k, v in expected["metrics"].items():
            assert got["metrics"][k]["count"] == v["count"]
            assert got["metrics"][k]["mean"] == pytest.approx(v["mean"], abs=2e-3), k  # 0.2 points x100
    else:
        for group in ("reconstruction_mse", "codebook_usage", "scale_wins"):
            for k, v in expected[group].items():
                assert got[group][k] == pytest.approx(v, rel=1e-2, abs=1e-3), (group, k)


def test_the_teachers_table_pairs_seeds_and_says_when_a_difference_shows(tmp_path):
    """benchmarks/exercises.py's table on made-up cells, against hand-computed values: exercise 4's scale-1
    reconstruction (x100) is 1, 2, 3 points above the baseline's on seeds 0, 1, 2: paired 2.00 +- 1.00, 95% interval
    2 +- 4.303 / sqrt(3) = [-0.48, +4.48], not settled, shown by 3 seeds of 3; the interval would clear 0 first at 4
    seeds (3.182 / sqrt(4) = 1.59 < 2; at 3, 2.48 > 2)."""
    import sys
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import exercises as bench
    import stats
    assert stats.seeds_to_settle(stats.paired({0: 1.0, 1: 2.0, 2: 3.0}, {0: 0.0, 1: 0.0, 2: 0.0})) == 4
    # mean 34, std 4: at 2 pairs 12.706 * 4 / sqrt(2) = 35.9 > 34, at 3 pairs 9.9: already at the 3 it has
    assert stats.seeds_to_settle(stats.paired({0: 30.0, 1: 34.0, 2: 38.0}, {0: 0, 1: 0, 2: 0})) == 3
    assert stats.seeds_to_settle(stats.paired({i: (-1.0) ** i for i in range(4)}, {i: 0.0 for i in range(4)})) == ">30"
    assert stats.seeds_to_settle(stats.paired({0: 2.0, 1: 2.0}, {0: 0.0, 1: 0.0})) is None  # no spread
    metrics = {"ari": 0.3, "ari_fg": 0.5, "miou": 0.4, "mbo": 0.4}
    for seed in range(3):
        for key, recon in (("baseline", 0.1 * (seed + 1)), ("4", 0.1 * (seed + 1) + 0.01 * (seed + 1))):
            cell = {"exercise": key, "title": "t", "seed": seed, "minutes": 1.0, "ran_on": "here", "loss": [],
                    "vae": [{"recon1": recon}], "ocl": [metrics]}
            (tmp_path / f"{key}__s{seed}.json").write_text(json.dumps(cell))
    row = [line for line in bench.table(tmp_path).splitlines() if line.startswith("| 4.")][0].split(" | ")
    assert row[4:10] == ["22.00 +- 11.00", "20.00 +- 10.00", "+2.00 [-0.48, +4.48]", "not settled", "3 of 3", "4"], row


def test_a_class_pools_its_runs_into_the_paired_table(tmp_path, capsys):
    """--pool: each student's `evaluate.py --json` under class/<exercise>/, paired by the seed each run records;
    students 0-3 ran the baseline, 0-2 exercise 7 (ARIfg 2, 3, 4 points below their own baseline: -3 +- 1, 95%
    interval -3 +- 4.303 / sqrt(3) = [-5.48, -0.52], lower, shown by 3 of 3); a folder that is no exercise is named."""
    import sys
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import exercises as bench

    def write(key, name, seed, ari_fg):
        (tmp_path / "class" / key).mkdir(parents=True, exist_ok=True)
        metrics = {k: {"mean": v, "count": 500} for k, v in (("ari", 0.3), ("ari_fg", ari_fg), ("miou", 0.4), ("mbo", 0.4))}
        (tmp_path / "class" / key / f"{name}.json").write_text(json.dumps(
            {"ckpt": "x", "kind": "ocl", "seed": seed, "metrics": metrics}))
    for seed, base in enumerate([0.50, 0.60, 0.40, 0.55]):
        write("baseline", f"student{seed}", seed, base)
        if seed < 3:
            write("7", f"student{seed}", seed, base - (seed + 2) / 100)
    text = bench.main(["--pool", str(tmp_path / "class")])
    row = next(line for line in text.splitlines() if line.startswith("| 7.")).split(" | ")
    assert row[1] == "3" and row[6:9] == ["-3.00 [-5.48, -0.52]", "lower", "3 of 3"], row
    (tmp_path / "class" / "seven").mkdir()
    (tmp_path / "class" / "seven" / "x.json").write_text("{}")
    with pytest.raises(SystemExit, match="seven/ is not an exercise"):
        bench.main(["--pool", str(tmp_path / "class")])
