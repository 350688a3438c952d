"""Planted bugs: does the fast test suite catch each of them?

``python -m benchmarks.mutants [--only NAME ...] [--json benchmarks/results/mutants.json]`` (``make mutants``)

Each mutant below is one small, plausible bug in a core behaviour (a loss or its gradient, a stop-gradient,
an EMA teacher, a schedule or lr rule, a gather, a queue, a probe, resume). For each, the repository's
package, tests and configs are copied to a temporary directory, the one edit is applied there (the exact
text must occur exactly once, so a mutant whose code has moved fails loudly instead of testing nothing),
and the suite of ``make test-fast`` runs against the copy (first only its files that test the mutated module:
a failure there is a failure of the whole fast suite; a mutant they miss gets the whole fast suite). A mutant
is *caught* when a test fails; the first failing test is recorded. The unmutated copy runs first and must pass. The working tree is never
modified. Results: a Markdown table on stdout and the JSON file; ``benchmarks/RESULTS.md`` quotes them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COPIED = ("ssl_zoo", "tests", "experiments", "benchmarks", "pyproject.toml", "constraints.txt", "Makefile", "README.md")
#: The selection ``make test-fast`` runs.
FAST_SUITE = ("-m", "not slow and not distributed")
#: The fast-suite files that test each mutated module, run first: if one of their fast tests fails, the whole
#: fast suite fails too (it contains them), so the mutant is caught without running the rest. A mutant they miss
#: is run against the whole fast suite before it is called uncaught.
FIRST_FILES: dict[str, tuple[str, ...]] = {
    "ssl_zoo/methods/bam_ia.py": ("tests/methods/test_bam_ia.py",),
    "ssl_zoo/losses/ia_closs.py": ("tests/losses/test_ia_closs.py",),
    "ssl_zoo/losses/asl.py": ("tests/losses/test_asl.py",),
    "ssl_zoo/losses/mim.py": ("tests/losses/test_mim.py",),
    "ssl_zoo/methods/hvp_mtl.py": ("tests/jobs/test_ema_teachers.py", "tests/methods/test_hvp_mtl.py"),
    "ssl_zoo/losses/moco.py": ("tests/losses/test_moco.py",),
    "ssl_zoo/losses/mpcl.py": ("tests/losses/test_mpcl.py", "tests/methods/test_mpcl.py"),
    "ssl_zoo/losses/ptb.py": ("tests/losses/test_ptb.py", "tests/methods/test_mpcl.py"),
    "ssl_zoo/methods/mpcl/parts.py": ("tests/jobs/test_ema_teachers.py", "tests/methods/test_mpcl.py"),
    "ssl_zoo/methods/mpcl/moco_v2.py": ("tests/methods/test_mpcl.py", "tests/methods/test_mpcl_reference.py"),
    "ssl_zoo/methods/mpcl/moco_v3.py": ("tests/jobs/test_ema_teachers.py", "tests/methods/test_mpcl.py"),
    "ssl_zoo/utils/ema.py": ("tests/jobs/test_ema_teachers.py", "tests/methods/test_hvp_mtl.py"),
    "ssl_zoo/utils/optim.py": ("tests/utils/test_optim.py",),
    "ssl_zoo/eval/metrics.py": ("tests/eval/test_metrics.py",),
    "ssl_zoo/eval/knn.py": ("tests/eval/test_knn.py", "tests/jobs/test_eval_end_to_end.py"),
    "ssl_zoo/eval/pooling.py": ("tests/eval/test_pooling.py", "tests/eval/test_features.py"),
    "ssl_zoo/eval/module.py": ("tests/eval/test_module.py", "tests/jobs/test_eval_end_to_end.py"),
    "ssl_zoo/data/sampler.py": ("tests/data/test_sampler.py", "tests/data/test_datamodule.py"),
}


@dataclass(frozen=True)
class Mutant:
    """One planted bug: replace ``find`` (occurring exactly once in ``file``) by ``replace``."""

    name: str
    file: str
    find: str
    replace: str
    breaks: str


MUTANTS: tuple[Mutant, ...] = (
    # ------------------------------------------------------------------ SimSiam / BAM + IA-CLoss
    Mutant("simsiam_no_stop_gradient", "ssl_zoo/methods/bam_ia.py",
           "self.similarity_loss(p1, z2.detach()) + self.similarity_loss(p2, z1.detach())",
           "self.similarity_loss(p1, z2) + self.similarity_loss(p2, z1)",
           "SimSiam's stop-gradient on the target branch (Eq. 3-4)"),
    Mutant("simsiam_same_view_pairing", "ssl_zoo/methods/bam_ia.py",
           "self.similarity_loss(p1, z2.detach()) + self.similarity_loss(p2, z1.detach())",
           "self.similarity_loss(p1, z1.detach()) + self.similarity_loss(p2, z2.detach())",
           "each prediction meets the other view's projection"),
    Mutant("ia_closs_factor_inside_log", "ssl_zoo/losses/ia_closs.py",
           "losses = -(log_numerator - log_denominator) / n_pos",
           "losses = -(log_numerator - n_pos.log() - log_denominator)",
           "IA-CLoss Eq. 1: 1/|P(i)| multiplies the log, not the sum inside it"),
    Mutant("ia_closs_anchor_in_denominator", "ssl_zoo/losses/ia_closs.py",
           "log_denominator = torch.logsumexp(logits.masked_fill(self_mask, neg_inf), dim=1)",
           "log_denominator = torch.logsumexp(logits, dim=1)",
           "A(i) excludes the anchor itself"),
    Mutant("ia_closs_gather_without_gradient", "ssl_zoo/losses/ia_closs.py",
           "z_all = gather(z)  # [W*N, D], gradients flow back to every rank's slice",
           "z_all = gather_no_grad(z)",
           "IA-CLoss under DDP: gradients of the other ranks' embeddings reach them"),
    # ------------------------------------------------------------------ HVP-MTL
    Mutant("asl_focusing_exponents_swapped", "ssl_zoo/losses/asl.py",
           "loss_pos = y * eta * (1.0 - p).pow(gamma_pos)",
           "loss_pos = y * eta * (1.0 - p).pow(gamma_neg)",
           "ASL Eq. 1: gamma+ on the positives"),
    Mutant("asl_eta_on_negatives", "ssl_zoo/losses/asl.py",
           "loss_neg = (1.0 - y) * p.pow(gamma_neg)",
           "loss_neg = (1.0 - y) * eta * p.pow(gamma_neg)",
           "ASL Eq. 1: eta weights the positives only"),
    Mutant("masked_l1_over_all_pixels", "ssl_zoo/losses/mim.py",
           "return error.sum() / num_masked.clamp(min=1.0)",
           "return error.sum() / error.numel()",
           "SimMIM Eq. 4: the mean over masked pixels"),
    Mutant("hvp_teacher_decoder_not_averaged", "ssl_zoo/methods/hvp_mtl.py",
           "((self.teacher_backbone, self.backbone), (self.teacher_decoder, self.decoder))",
           "((self.teacher_backbone, self.backbone),)",
           "HVP-MTL's EMA teacher: the decoder follows the student too"),
    Mutant("ema_arguments_in_teacher_student_order", "ssl_zoo/methods/hvp_mtl.py",
           "update_momentum(student, teacher, m)",
           "update_momentum(teacher, student, m)",
           "lightly's update_momentum(model, model_ema, m): the teacher follows the student, not the reverse"),
    Mutant("hvp_teacher_bn_statistics_frozen", "ssl_zoo/methods/hvp_mtl.py",
           "                t.copy_(s)",
           "                pass",
           "HVP-MTL's eval-mode teacher computes no BatchNorm statistics: it takes the student's"),
    # ------------------------------------------------------------------ MoCo / MPCL
    Mutant("moco_v3_no_2tau_scale", "ssl_zoo/losses/moco.py",
           "loss = F.cross_entropy(logits, labels) * (2.0 * temperature)",
           "loss = F.cross_entropy(logits, labels)",
           "MoCo v3's 2 tau loss scale"),
    Mutant("moco_v2_key_not_normalised", "ssl_zoo/losses/moco.py",
           "k = F.normalize(k.detach().float(), dim=1)  # [B, D]\n    # A copy",
           "k = k.detach().float()  # [B, D]\n    # A copy",
           "MoCo v2 InfoNCE on unit keys"),
    Mutant("queue_pointer_stuck", "ssl_zoo/losses/moco.py",
           "self.ptr.copy_((self.ptr + num_new) % self.size)",
           "self.ptr.copy_(self.ptr % self.size)",
           "the MoCo queue advances (first in, first out)"),
    Mutant("pcr_counts_self_similarity", "ssl_zoo/losses/mpcl.py",
           "per_sample = torch.where(off_diagonal, cos, 0.0).sum(dim=2) / (num_proj - 1)",
           "per_sample = cos.sum(dim=2) / (num_proj - 1)",
           "PCR Eq. 2 sums over the other projectors only"),
    Mutant("ptb_favours_accurate_projectors", "ssl_zoo/losses/ptb.py",
           "return torch.softmax((1.0 - acc) / epsilon, dim=0)",
           "return torch.softmax(acc / epsilon, dim=0)",
           "PTB Eq. 3 up-weights the weaker projectors"),
    Mutant("ptb_counts_steps_not_queries", "ssl_zoo/losses/ptb.py",
           "n = torch.tensor([float(batch_size)], device=acc.device)",
           "n = torch.ones(1, device=acc.device)",
           "PTB's acc_m is the epoch's mean accuracy over its queries, not over its steps"),
    Mutant("mocov2_enqueues_before_the_loss", "ssl_zoo/methods/mpcl/moco_v2.py",
           "        losses, accs = per_projector(moco_v2_info_nce, q, k, [queue.keys for queue in self.queues],\n"
           "                                     temperature=self.hparams.temperature)  # [Mp], [Mp]\n"
           "        for queue, keys in zip(self.queues, k, strict=True):  # each projector's keys into its own queue\n"
           "            queue.enqueue(keys)\n",
           "        for queue, keys in zip(self.queues, k, strict=True):  # each projector's keys into its own queue\n"
           "            queue.enqueue(keys)\n"
           "        losses, accs = per_projector(moco_v2_info_nce, q, k, [queue.keys for queue in self.queues],\n"
           "                                     temperature=self.hparams.temperature)  # [Mp], [Mp]\n",
           "MoCo's negatives are the queue before this batch's keys join it (else each positive is a negative too)"),
    Mutant("mpcl_momentum_backbone_frozen", "ssl_zoo/methods/mpcl/parts.py",
           "update_momentum(module.backbone, module.teacher_backbone, momentum)",
           "pass",
           "MoCo Eq. 2: the key encoder's backbone follows the query encoder"),
    Mutant("ema_weights_swapped", "ssl_zoo/methods/mpcl/parts.py",
           "update_momentum(module.projectors, module.teacher_projectors, momentum)",
           "update_momentum(module.projectors, module.teacher_projectors, 1.0 - momentum)",
           "theta_t <- m theta_t + (1 - m) theta_s, not the other way round"),
    Mutant("key_encoder_copies_student_bn_statistics", "ssl_zoo/methods/mpcl/parts.py",
           "update_momentum(module.projectors, module.teacher_projectors, momentum)\n",
           "update_momentum(module.projectors, module.teacher_projectors, momentum)\n"
           "    for t, s in zip(module.teacher_backbone.buffers(), module.backbone.buffers(), strict=True):\n"
           "        t.copy_(s)\n",
           "MoCo's key encoder keeps the BatchNorm statistics of its own forward"),
    Mutant("mocov3_momentum_one_step_early", "ssl_zoo/methods/mpcl/moco_v3.py",
           "cosine_schedule(min(step, total), total + 1,",
           "cosine_schedule(min(step, total), total,",
           "MoCo v3's momentum reaches 1 after the last step K (lightly's schedule ends at max_steps - 1)"),
    Mutant("ema_every_micro_batch", "ssl_zoo/utils/ema.py",
           "        if global_step == self.last_step:\n            return False",
           "        if False:\n            return False",
           "EMA teachers move once per optimiser step under gradient accumulation"),
    # ------------------------------------------------------------------ schedules and lr scaling
    Mutant("cosine_without_pi", "ssl_zoo/utils/optim.py",
           "0.5 * (1.0 + math.cos(math.pi * progress))",
           "0.5 * (1.0 + math.cos(progress))",
           "the half-cosine decay reaches its floor"),
    Mutant("warmup_skipped", "ssl_zoo/utils/optim.py",
           "if warmup_steps > 0 and step < warmup_steps:",
           "if False:",
           "linear warm-up"),
    Mutant("lr_scaled_by_512", "ssl_zoo/utils/optim.py",
           "return base_lr * batch_size / reference",
           "return base_lr * batch_size / (2 * reference)",
           "linear scaling rule lr = base_lr x batch / reference"),
    Mutant("global_batch_ignores_accumulation", "ssl_zoo/utils/optim.py",
           "return int(per_process) * trainer.world_size * trainer.accumulate_grad_batches",
           "return int(per_process) * trainer.world_size",
           "the global batch counts accumulated micro-batches"),
    Mutant("predictor_lr_decays", "ssl_zoo/utils/optim.py",
           "(lambda _step: 1.0) if i in constant_groups else schedule",
           "schedule",
           "SimSiam's fixed predictor lr"),
    # ------------------------------------------------------------------ evaluation
    Mutant("threshold_strict", "ssl_zoo/eval/metrics.py",
           "predicted = (scores >= threshold).long()",
           "predicted = (scores > threshold).long()",
           "a label is predicted when its score is >= the threshold"),
    Mutant("knn_vote_unweighted", "ssl_zoo/eval/knn.py",
           "weights = (sims / temperature).softmax(dim=1)",
           "weights = torch.full_like(sims, 1.0 / sims.shape[1])",
           "the kNN vote weights neighbours by exp(s / T)"),
    Mutant("gamp_is_gap", "ssl_zoo/eval/pooling.py",
           '"gamp": "fastavgmax"',
           '"gamp": "fastavg"',
           "GAMP = (GAP + GMP) / 2"),
    Mutant("padded_duplicates_counted", "ssl_zoo/eval/module.py",
           "scores, targets = scores[keep], targets[keep]",
           "pass",
           "DistributedSampler's padded samples count once"),
    # ------------------------------------------------------------------ resume
    Mutant("sampler_resume_ignored", "ssl_zoo/data/sampler.py",
           "self._resume = (epoch, start) if start else None",
           "self._resume = None",
           "a resumed epoch skips the batches already trained on"),
)


def _copy_tree(destination: Path) -> None:
    patterns = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache")

    def ignore(directory: str, names: list[str]) -> set[str]:
        skipped = set(patterns(directory, names))
        if Path(directory) == ROOT / "benchmarks":
            skipped |= {"runs"} & set(names)  # benchmark run outputs
        return skipped

    for name in COPIED:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, destination / name, ignore=ignore)
        else:
            shutil.copy2(source, destination / name)
    # the Makefile's tests call make -n / make with the virtualenv stamp taken as built: the copy shares the venv
    if (ROOT / ".venv").exists():
        (destination / ".venv").symlink_to(ROOT / ".venv")


def apply(mutant: Mutant, root: Path) -> None:
    """Apply ``mutant`` to the copy under ``root``; its text must occur exactly once."""
    path = root / mutant.file
    text = path.read_text()
    count = text.count(mutant.find)
    if count != 1:
        raise ValueError(f"mutant '{mutant.name}': the text to replace occurs {count} times in {mutant.file} "
                         f"(expected once); update the mutant to the current code")
    path.write_text(text.replace(mutant.find, mutant.replace))


def first_files(mutant: Mutant, root: Path) -> list[str]:
    """The fast-suite files that test ``mutant``'s module; every one must exist under ``root``."""
    files = list(FIRST_FILES.get(mutant.file, ()))
    missing = [f for f in files if not (root / f).is_file()]
    if not files or missing:
        raise ValueError(f"mutant '{mutant.name}': FIRST_FILES[{mutant.file!r}] "
                         + (f"names missing test files {missing}" if files else "is not listed")
                         + "; update benchmarks/mutants.py to where the module's tests are")
    return files


def run_suite(root: Path, pytest_args: list[str], timeout: float) -> tuple[int, str, float]:
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("PYTHONPATH", None)
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *FAST_SUITE,
                               *pytest_args], cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
        return proc.returncode, proc.stdout + proc.stderr, time.perf_counter() - start
    except subprocess.TimeoutExpired as err:
        return -1, f"timed out after {timeout:.0f} s\n{err.stdout or ''}", time.perf_counter() - start


def first_failure(output: str) -> str | None:
    match = re.search(r"^(?:FAILED|ERROR) (\S+)", output, flags=re.MULTILINE)
    return match.group(1) if match else None


def markdown_table(report: dict) -> str:
    lines = ["| mutant | breaks | caught | first failing test | run | s |", "| --- | --- | --- | --- | --- | --- |"]
    for r in report["mutants"]:
        lines.append(f"| `{r['name']}` | {r['breaks']} | {'yes' if r['caught'] else '**no**'} | "
                     f"{r['first_failure'] or ''} | {r.get('caught_by', 'fast suite')} | {r['seconds']:.0f} |")
    caught = sum(r["caught"] for r in report["mutants"])
    lines.append(f"\n{caught} of {len(report['mutants'])} caught by the fast suite "
                 f"(`pytest -m \"{FAST_SUITE[1]}\"`).")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.mutants", description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", default=None, help="run these mutants only")
    parser.add_argument("--list", action="store_true",
                        help="list the mutants and check that each applies and names existing first files")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "mutants.json")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per suite run")
    parser.add_argument("--pytest-args", default="", help="extra pytest arguments (e.g. '-k losses')")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTANTS if args.only is None or m.name in args.only]
    unknown = set(args.only or ()) - {m.name for m in MUTANTS}
    if unknown:
        parser.error(f"unknown mutant(s) {sorted(unknown)}; --list shows them")
    pytest_args = args.pytest_args.split()
    with tempfile.TemporaryDirectory(prefix="ssl_zoo_mutants_") as tmp:
        pristine = Path(tmp) / "pristine"
        _copy_tree(pristine)
        for mutant in chosen:  # every mutant applies to today's code before anything runs
            scratch = Path(tmp) / "check"
            shutil.copytree(pristine, scratch, symlinks=True)
            apply(mutant, scratch)
            first_files(mutant, scratch)
            shutil.rmtree(scratch)
        if args.list:
            for m in chosen:
                print(f"{m.name:36s} {m.file:32s} {m.breaks}")
            return 0
        rc, output, seconds = run_suite(pristine, pytest_args, args.timeout)
        if rc != 0:
            print(output[-3000:], file=sys.stderr)
            print(f"error: the unmutated suite does not pass (exit {rc}); fix it before planting bugs",
                  file=sys.stderr)
            return 1
        print(f"unmutated suite passes in {seconds:.0f} s", file=sys.stderr)
        results = []
        for mutant in chosen:
            work = Path(tmp) / mutant.name
            shutil.copytree(pristine, work, symlinks=True)
            apply(mutant, work)
            first = first_files(mutant, work)
            selection = "files testing the module"
            rc, output, seconds = run_suite(work, [*first, *pytest_args], args.timeout)
            if rc in (0, 5):  # missed by the module's own files: the whole fast suite decides
                selection = "fast suite"
                rc, output, more = run_suite(work, pytest_args, args.timeout)
                seconds += more
            caught = rc not in (0, 5)
            results.append({**asdict(mutant), "caught": caught, "exit_code": rc, "caught_by": selection,
                            "first_failure": first_failure(output), "seconds": round(seconds, 1)})
            print(f"{mutant.name}: {'caught' if caught else 'NOT caught'} ({seconds:.0f} s) "
                  f"{first_failure(output) or ''}", file=sys.stderr)
            shutil.rmtree(work)
    report = {"suite": " ".join(FAST_SUITE), "mutants": results,
              "machine": {"python": platform.python_version(), "platform": platform.platform(),
                          "cpus": os.cpu_count()},
              "date": time.strftime("%Y-%m-%d")}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(markdown_table(report))
    return 0 if all(r["caught"] for r in results) else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
