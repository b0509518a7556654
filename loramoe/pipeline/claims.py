"""The paper's claims, each tested on this run's numbers: a verdict from intervals and paired
tests, never from a bare difference.

Branches play roles by what they trained: "sft", "lora", "loramoe_nolbc" (β = 0) and
"loramoe_<form>" (β > 0, form "paper" or "aligned"). Every claim is read at the largest data
scale that the roles it needs share (the paper's regime: the most instruction data).
Where the roles were trained with several seeds (one run with `seeds`, or runs pooled by
replicates.py), a claim's test pools the seeds both branches share (crossed bootstrap over
seeds and items, paired by seed), so training noise counts against the claim.
The "paper" column quotes the paper's stated claim; its own figures are not restated here
(the paper's tables are not available offline to this project: compare against the PDF).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from loramoe.evaluate.stats import ALPHA, holm_adjust
from loramoe.pipeline.config import branch_name
from loramoe.pipeline.numbers import p_value, score, with_interval
from loramoe.pipeline.paired import difference, replicates_at_shared_seeds
from loramoe.tracking.runs import flatten

DOWNSTREAM_MARGIN = 0.05  # "within a few points of SFT": the paired CI's lower bound > −5 points
NO_SEPARATION = 0.02  # a router-separation CI inside ±0.02 reads as "no separation"
PAPER_BETA = 0.1  # the paper's LBC weight: the claims are about the paper's configuration


def _train_config(branch: dict[str, Any]) -> dict[str, Any]:
    return branch.get("trained", {}).get("train_config", {})


def role(branch: dict[str, Any]) -> str:
    config = _train_config(branch)
    method = config.get("method", branch.get("method"))
    if method != "loramoe":
        return method
    moe = config.get("loramoe", {})
    return f"loramoe_{moe.get('lbc_form', 'paper')}" if moe.get("lbc_beta", 0) > 0 \
        else "loramoe_nolbc"


def _ok(branches: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [b for b in branches if not b.get("error")]


def _off_paper_beta(branch: dict[str, Any]) -> float:
    """How far the branch's LBC weight is from the paper's (0 for methods without one)."""
    moe = _train_config(branch).get("loramoe", {})
    return abs(moe.get("lbc_beta", PAPER_BETA) - PAPER_BETA) if role(branch).startswith(
        ("loramoe_paper", "loramoe_aligned")) else 0.0


def at_largest_shared_scale(branches, *roles: str) -> list[dict[str, Any]] | None:
    """One branch per role at the largest scale all of them ran (None if a role is missing).
    Where several branches share a role and scale (e.g. a sweep of β), the one nearest the
    paper's β; ties: the first in config order."""
    by_role: dict[str, dict[int, dict]] = {}
    for b in _ok(branches):
        slot = by_role.setdefault(role(b), {})
        held = slot.get(b["scale"])
        if held is None or _off_paper_beta(b) < _off_paper_beta(held):
            slot[b["scale"]] = b
    if any(r not in by_role for r in roles):
        return None
    shared = set.intersection(*(set(by_role[r]) for r in roles))
    return [by_role[r][max(shared)] for r in roles] if shared else None


def _names(branches: list[dict[str, Any]], test: dict | None = None) -> str:
    """The branches a claim read (names carry the scale), e.g. "loramoe_paper-512 vs sft-512";
    without the seed where `test` pooled the seeds (one seed's names would misread it)."""
    if test is not None and "per_seed" in test:
        return " vs ".join(branch_name({"method": b["method_name"], "scale": b["scale"]})
                           for b in branches)
    return " vs ".join(b["name"] for b in branches)


@dataclass
class Claim:
    """One row of the table. `tests` are its paired tests (McNemar, paired bootstrap); their
    p-values join the table's Holm family before `judge` reads their `significant` and
    returns (ours, verdict)."""

    claim: str
    paper: str
    tests: list[dict[str, Any]] = field(default_factory=list)
    judge: Callable[[], tuple[str, str]] = lambda: ("", "not measured")


def _not_measured(claim: str, paper: str, needs: str) -> Claim:
    return Claim(claim, paper, judge=lambda: (needs, "not measured"))


def _verdict(significant: bool, better: bool, n: int | None = None) -> str:
    if n == 0:
        return "not measured"  # no base-known facts (or items) to compare on
    if not significant:
        return "inconclusive"
    return "reproduced" if better else "not reproduced"


def _ret(test: dict) -> str:
    if not test["n"]:
        return "no base-known facts"
    if "per_seed" in test:
        return _ci(test) + _seeds(test)
    return f"{_interval(test)} (McNemar p = {p_value(test['p'])}, " \
           f"Holm p = {p_value(test['p_holm'])}; " \
           f"{test['only_a']} vs {test['only_b']} discordant of {test['n']})"


def _seeds(test: dict) -> str:
    """How a pooled test was made, e.g. "; 2 seeds, each +0.010 / +0.014; 994 items"."""
    if "per_seed" not in test:
        return ""
    each = " / ".join(score(v, signed=True) for v in test["per_seed"])
    return f"; {test['seeds']} seeds, each {each}; {test['n']} items, crossed bootstrap"


def _interval(test: dict, key: str = "diff") -> str:
    """e.g. "+0.005 [+0.000, +0.010]"."""
    if test.get("ci") is None:
        return "no items"
    return with_interval(test[key], *test["ci"], signed=True)


def _ci(test: dict, key: str = "diff") -> str:
    """The interval, with the test's Holm-adjusted p where it has one."""
    text = _interval(test, key)
    if test.get("ci") is None or test.get("p_holm") is None:
        return text
    return f"{text} (Holm p = {p_value(test['p_holm'])})"


def claim_forgetting(branches) -> Claim:
    claim = "Vanilla SFT forgets world knowledge as instruction data grows"
    paper = ("abstract: 'large-scale increases in instruction data can damage the world "
             "knowledge previously stored in LLMs'")
    by_scale: dict[int, dict] = {}  # one branch a scale (seed replicates pool in the test)
    for b in _ok(branches):
        if role(b) == "sft":
            by_scale.setdefault(b["scale"], b)
    sft = [by_scale[s] for s in sorted(by_scale)]
    if len(sft) < 2:
        return _not_measured(claim, paper, "needs SFT at ≥ 2 scales")
    test = difference(sft[-1], sft[0], branches, "probe_retention")  # largest - smallest
    return Claim(claim, paper, [test], lambda: (
        f"SFT probe retention {sft[-1]['scale']} vs {sft[0]['scale']} examples: {_ret(test)}",
        _verdict(test["significant"], (test["diff"] or 0) < 0, test["n"])))


def claim_keeps_knowledge(branches, other: str) -> Claim:
    claim = f"LoRAMoE + LBC keeps more world knowledge than {other.upper()}"
    paper = ("abstract: as instruction data increases, LoRAMoE maintains 'the world "
             "knowledge stored in the LLM'")
    pair = at_largest_shared_scale(branches, "loramoe_paper", other)
    if pair is None:
        return _not_measured(claim, paper, f"needs loramoe (LBC, paper form) and {other}")
    test = difference(*pair, branches, "probe_retention")
    return Claim(claim, paper, [test], lambda: (
        f"probe retention, {_names(pair, test)}: {_ret(test)}",
        _verdict(test["significant"], (test["diff"] or 0) > 0, test["n"])))


def claim_downstream(branches) -> Claim:
    """A margin claim ("within a few points"), read from the paired 95% interval against the
    margin; it is not a test of a difference, so it is not in the Holm family."""
    claim = "LoRAMoE's downstream score is within a few points of vanilla SFT"
    paper = ("abstract: LoRAMoE 'can significantly improve the ability to process downstream "
             "tasks'")
    pair = at_largest_shared_scale(branches, "loramoe_paper", "sft")
    if pair is None:
        return _not_measured(claim, paper, "needs loramoe (LBC) and sft")
    test = difference(*pair, branches, "downstream")
    if test["ci"] is None:
        return _not_measured(claim, paper, "no downstream items")
    lo, hi = test["ci"]
    verdict = ("reproduced" if lo > -DOWNSTREAM_MARGIN else
               "not reproduced" if hi < -DOWNSTREAM_MARGIN else "inconclusive")
    return Claim(claim, paper, judge=lambda: (
        f"LoRAMoE − SFT, {_names(pair, test)}: {_ci(test)} (margin {DOWNSTREAM_MARGIN:.2f})"
        f"{_seeds(test)}", verdict))


LBC_FIELDS = ("loramoe.lbc_beta", "loramoe.lbc_form", "loramoe.lbc_load")


def confounders(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """The train-config fields two branches differ in besides the LBC's own (and paths)."""
    fa, fb = (flatten(_train_config(x)) for x in (a, b))
    skip = {"train_file", "output_dir", *LBC_FIELDS}
    return sorted(k for k in fa.keys() | fb.keys() if k not in skip and fa.get(k) != fb.get(k))


def claim_lbc_helps(branches, form: str) -> Claim:
    """The LBC branch against the β = 0 branch that differs from it in the LBC alone (at one
    scale): another difference (a router lr, a rank) would be credited to the LBC."""
    claim = f"The LBC ({form} form) helps LoRAMoE"
    paper = ("Sec. 3: the LBC makes a portion of experts focus on world knowledge "
             "(ablation in the paper)")
    pair = at_largest_shared_scale(branches, f"loramoe_{form}", "loramoe_nolbc")
    if pair is None:
        return _not_measured(claim, paper, f"needs loramoe with the {form} LBC and with β = 0")
    lbc = pair[0]
    controls = [b for b in _ok(branches)
                if role(b) == "loramoe_nolbc" and b["scale"] == lbc["scale"]]
    pair = [lbc, min(controls, key=lambda c: len(confounders(lbc, c)))]  # ties: config order
    other = confounders(*pair)
    if other:
        return _not_measured(claim, paper, f"needs a β = 0 branch that differs from "
                             f"{lbc['name']} in the LBC alone ({_names(pair)} also differ in "
                             f"{', '.join(other)})")
    kept, down = (difference(*pair, branches, m) for m in ("probe_retention", "downstream"))

    def judge() -> tuple[str, str]:
        signs = [t["diff"] for t in (kept, down) if t["significant"]]  # None never significant
        worse, better = any(d < 0 for d in signs), any(d > 0 for d in signs)
        verdict = "not reproduced" if worse else "reproduced" if better else "inconclusive"
        return (f"vs β = 0, {_names(pair, kept)}: retention {_ret(kept)}; downstream "
                f"{_ci(down)}{_seeds(down)}", verdict)

    return Claim(claim, paper, [kept, down], judge)


def claim_separation(branches, form: str) -> Claim:
    """Read from the separation's 95% interval against a stated margin (no test of a
    difference between branches, so not in the Holm family). With seed replicates every
    seed is read: the claim holds (or fails) only if it does for each of them."""
    claim = f"Routers separate by expert type (LBC, {form} form)"
    paper = ("abstract (v1): LoRAMoE 'can reasonably coordinate experts based on data "
             "type during inference' (Fig. 7)")
    found = at_largest_shared_scale(branches, f"loramoe_{form}")
    replicates = replicates_at_shared_seeds(found[0], found[0], branches)[0] if found else []
    seps = [r["metrics"].get("router_separation") for r in replicates]
    if not seps or any(not sep or sep.get("ci") is None for sep in seps):
        return _not_measured(claim, paper, f"needs loramoe with the {form} LBC")
    verdicts = {_separation_verdict(*sep["ci"]) for sep in seps}
    verdict = verdicts.pop() if len(verdicts) == 1 else "inconclusive"
    return Claim(claim, paper, judge=lambda: (
        "knowledge-expert weight, knowledge − downstream tasks, "
        + "; ".join(f"{r['name']}: {_ci(sep, 'value')}"
                    for r, sep in zip(replicates, seps, strict=True)), verdict))


def _separation_verdict(lo: float, hi: float) -> str:
    # a CI inside ±NO_SEPARATION is no separation worth the name, even if it excludes 0
    return ("not reproduced" if hi < 0 or (lo > -NO_SEPARATION and hi < NO_SEPARATION)
            else "reproduced" if lo > 0 else "inconclusive")


def adjust_family(tests: list[dict[str, Any]]) -> None:
    """Holm-adjust the tests' p-values as one family: each test gets `p_holm`, and
    `significant` now means p_holm < ALPHA."""
    for test, p_holm in zip(tests, holm_adjust([t.get("p") for t in tests]), strict=True):
        test["p_holm"] = p_holm
        test["significant"] = p_holm is not None and p_holm < ALPHA


def paper_claims(branches: list[dict[str, Any]]) -> pd.DataFrame:
    """The claims table. Every paired test behind a verdict is one Holm family, so the table
    as a whole, not each row, keeps the 5 % error rate."""
    claims = [claim_forgetting(branches), claim_keeps_knowledge(branches, "sft"),
              claim_keeps_knowledge(branches, "lora"), claim_downstream(branches),
              *(claim_lbc_helps(branches, f) for f in ("paper", "aligned")),
              *(claim_separation(branches, f) for f in ("paper", "aligned"))]
    family = [t for c in claims for t in c.tests if t.get("n")]
    adjust_family(family)
    rows = [{"claim": c.claim, "paper": c.paper, **dict(zip(("ours", "verdict"), c.judge(),
                                                              strict=True))}
            for c in claims]
    return pd.DataFrame(rows, columns=["claim", "paper", "ours", "verdict"]).assign(
        tests_in_family=len(family))
