"""The registry walk: every registered family, every tiny variant of it, through what vlmkit does with a model.

The cases come from the registry (``families.families()`` x ``family.variants()``), so a new family, a new
LLaVA backbone row or a new BLIP-2 language model is walked without a new test. Each case is a tiny random
model in the layout its real release (or training run) leaves, built by the family (``make_tiny``), with the
loading options such a layout needs (``tiny_options``: the parts beside it, head counts no shape holds).

Per case: ``inspect`` names the family; the plan (dry run) claims every source tensor and makes exactly the
tensors the target model has; the float32 conversion runs backwards to the source tensors bit for bit (every
one, where the family declares itself ``REVERSIBLE``); ``verify`` passes; a family that ``GENERATES`` answers
two greedy turns, one that does not is refused by ``vlmkit.load`` (one error naming the path and its family);
GGUF files are written where the family's form has the capability (llama.cpp's checks are tests/gguf's), else
the refusal says why; a variant whose image path llama.cpp cannot run (``GGUF_TEXT_ONLY``) is refused with the reason
and written with ``--text-only``. ``verify`` passes with no assumption, or with only values the case's ``--config``
states (a CONDITIONAL PASS).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import pytest
import torch

import vlmkit
from vlmkit import api, families
from vlmkit.conversion import MANIFEST, compile_plan, reverse
from vlmkit.conversion import engine
from vlmkit.conversion.engine import apply_step
from vlmkit.errors import VlmkitError
from vlmkit.options import LoadOptions
from vlmkit.tensors import open_source

from .conftest import built_once, run_cli, tiny_release

CAT = Path(__file__).parent / "fixtures" / "images" / "chelsea.png"
PROBES = [(CAT, "What is shown in this image?")]
CASES = [(family, variant) for family in families.families() for variant in family.variants()]
IDS = [f"{family.NAME}-{variant}" for family, variant in CASES]


@dataclass
class Case:
    family: object
    variant: str
    path: Path  # what the user gives vlmkit (built once per run, shared: read-only)
    load_options: dict  # vlmkit.load keywords the layout needs
    work: Path  # this worker's folder for what the tests write
    factory: pytest.TempPathFactory

    @property
    def options(self) -> LoadOptions:
        return LoadOptions(dtype="float32", **self.load_options)

    @cached_property
    def conversion(self):
        return api.prepare(self.path, self.options)

    @cached_property
    def plan(self):
        """The checked plan, as ``vlmkit convert --dry-run`` gives it (nothing written): ``api.convert``'s run of the
        prepared conversion, which the other steps share."""
        plan = engine.run(self.conversion, self.work / "dry-run", dtype=self.options.dtype, dry_run=True).plan
        assert not (self.work / "dry-run").exists()
        return plan

    @cached_property
    def losses(self) -> list[str]:
        """What the conversion cannot give back: dropped tensors, rules with an op that has no inverse."""
        return [d.source.name for d in self.plan.drops] + _irreversible(self.conversion)

    @cached_property
    def converted(self) -> Path:
        """The float32 conversion, made once per run (the other xdist worker reuses it)."""
        def build(root: Path) -> Path:
            api.convert(self.path, root / "hf", options=self.options)
            return root / "hf"

        return built_once(self.factory, f"walk-{self.family.NAME}-{self.variant}-hf", build)


@pytest.fixture(scope="session")
def walk(tmp_path_factory):
    """``walk(family, variant)``: the case, built once per run (tests ask for any case, in any order): its tiny model
    is ``tiny_release``'s, the one the families' own tests use."""
    built: dict[tuple[str, str], Case] = {}

    def get(family, variant) -> Case:
        key = (family.NAME, variant)
        if key not in built:
            release = tiny_release(tmp_path_factory, family, variant)
            built[key] = Case(family, variant, release["path"], release["options"],
                              tmp_path_factory.mktemp(f"walk-{family.NAME}-{variant}"), tmp_path_factory)
        return built[key]

    return get


@pytest.fixture(params=CASES, ids=IDS)
def case(request, walk) -> Case:
    return walk(*request.param)


def test_the_registry_has_every_family_with_its_traits():
    assert [f.NAME for f in families.families()] == list(families.FAMILIES)
    for family in families.families():
        assert family.variants(), f"{family.NAME}: no tiny variant to walk"
        assert isinstance(family.REVERSIBLE, bool) and isinstance(family.GENERATES, bool), family.NAME


def test_inspect_names_the_family(case):
    found = families.find(case.path)
    assert found is not None and found.name == case.family.NAME
    assert vlmkit.inspect(case.path)["family"] == case.family.NAME


def test_the_plan_claims_every_tensor_and_makes_the_target(case):
    conversion, plan = case.conversion, case.plan
    claimed = [s.name for step in plan.steps for s in step.sources] + [d.source.name for d in plan.drops]
    assert sorted(claimed) == sorted(conversion.source.keys())  # no source tensor unclaimed or claimed twice
    targets = [t.name for t in plan.targets]
    assert len(targets) == len(set(targets))
    if conversion.expected is not None:  # the target model's own tensor list (None: a copy, names kept)
        assert {t.name: t.shape for t in plan.targets} == {n: tuple(s) for n, s in conversion.expected.items()}
    else:
        assert set(targets) == set(conversion.source.keys()) - {d.source.name for d in plan.drops}
    assert {t.dtype for t in plan.targets} <= {"F32", "I64"}, "float32 asked for"


def _irreversible(conversion) -> list[str]:
    """The rules (drops aside) with an op that has no inverse, e.g. a LoRA merge."""
    out = []
    for rule in conversion.rules:
        try:
            None if rule.is_drop else rule.reversed()
        except NotImplementedError:
            out.append(rule.name)
    return out


def test_the_conversion_runs_backwards_to_the_source(case):
    """Reverse the rules on the converted tensors: every source tensor not dropped comes back bit for bit."""
    conversion = case.conversion
    if _irreversible(conversion):  # a LoRA merge: nothing runs backwards (the family says so: see the next test)
        assert not case.family.REVERSIBLE
        return
    out = open_source(case.converted)
    back_plan = compile_plan(reverse(conversion.rules), [out.info(n) for n in out.keys()])
    back = {}
    for step in back_plan.steps:
        back.update(zip((t.name for t in step.targets), apply_step(step, [out.read(i.name) for i in step.sources])))
    assert set(back) == set(conversion.source.keys()) - {d.source.name for d in case.plan.drops}
    for name, tensor in back.items():
        original = conversion.source.read(name)
        # converted to float32: a narrower float comes back exactly when cast to its own dtype
        assert tensor.dtype in (original.dtype, torch.float32), name
        assert torch.equal(tensor.to(original.dtype), original), name


@pytest.mark.parametrize("family", families.families(), ids=lambda f: f.NAME)
def test_reversible_is_what_the_conversions_do(walk, family):
    """REVERSIBLE: no variant drops a tensor or has an op without an inverse, so the whole source comes back;
    not REVERSIBLE: some variant does (the first losses name what)."""
    losses = {v: walk(family, v).losses for v in family.variants()}
    lossy = {v: names[:3] for v, names in losses.items() if names}
    assert bool(lossy) != family.REVERSIBLE, f"{family.NAME}: REVERSIBLE = {family.REVERSIBLE}, losses {lossy}"


def test_verify_passes(case):
    found = families.find(case.path)
    if not families.can(found, "verify") or case.family.REVERSIBLE:
        # nothing to prove (no verify), or --to hf copies the tensors unchanged (CLIP verifies its GGUF only): the
        # refusal names the folder it will not verify
        with pytest.raises(VlmkitError) as refused:
            api.verify(case.path, case.converted, options=case.options, probes=PROBES, max_new_tokens=4)
        assert str(case.path) in str(refused.value) or str(case.converted) in str(refused.value)
        return
    report = api.verify(case.path, case.converted, options=case.options, probes=PROBES, max_new_tokens=4)
    shown = report.render() if hasattr(report, "render") else report
    assert report.passed, shown
    # a CONDITIONAL PASS only where every assumed value is one the case's --config states (a tiny tower's head count)
    unstated = [a for a in report.assumptions if not _stated(a, case.load_options.get("config") or {})]
    assert not unstated, f"assumed values the case's options do not state: {unstated}"
    assert report.verdict.startswith("CONDITIONAL PASS") if report.assumptions else report.verdict == "PASS", shown


def _stated(assumption: str, config: dict) -> bool:
    """``"vision_config.num_attention_heads = 2 (from --config...)"``: the field has that value in ``config``."""
    match = re.match(r"([\w.]+) = (.+?) \(from --config[;)]", assumption)
    if match is None:
        return False
    value = config
    for key in match[1].split("."):
        if not isinstance(value, dict) or key not in value:
            return False
        value = value[key]
    return repr(value) == match[2]


def test_chat_two_greedy_turns(case):
    found = families.find(case.path)
    assert case.family.GENERATES == ("chat_backend" in case.family.FORMS[found.form])  # the trait is the table's
    if not case.family.GENERATES:
        with pytest.raises(VlmkitError) as refused:
            vlmkit.load(case.path, **case.load_options)
        assert str(case.path) in str(refused.value) and case.family.NAME in str(refused.value), refused.value
        return
    model = vlmkit.load(case.path, **case.load_options)
    messages = [{"role": "user", "content": "What is shown in this image?", "images": [CAT]}]
    first = model.chat(messages, temperature=0, max_new_tokens=4)
    messages += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "And its colours?"}]
    second = model.chat(messages, temperature=0, max_new_tokens=4)
    for reply in (first, second):
        assert 0 < len(reply.tokens) <= 4 and reply.finish_reason in ("stop", "length")
    assert second.prompt_tokens > first.prompt_tokens + len(first.tokens)  # the second turn reads the first


def _flags(case: Case) -> list:
    """``tiny_options`` as the command-line flags a user types."""
    flags = []
    for key, value in case.load_options.items():
        if key == "config":
            (case.work / "config-override.json").write_text(json.dumps(value))
            value = case.work / "config-override.json"
        flags += [f"--{key.replace('_', '-')}", value]
    return flags


def test_gguf_is_written_or_refused_with_the_reason(case):
    """``vlmkit convert --to gguf`` as a user runs it: the files where the family's form has the capability (what
    llama.cpp makes of them is tests/gguf's), else one error naming the path and what vlmkit can do with it."""
    found = families.find(case.path)
    destination = case.work / "gguf"
    r = run_cli("convert", case.path, destination, "--to", "gguf", "--quiet", *_flags(case))
    if case.variant in getattr(case.family, "GGUF_TEXT_ONLY", ()):  # llama.cpp cannot run its image path
        assert r.code == 1 and "Traceback" not in r.err and not destination.exists()
        assert str(case.path) in r.err and "llama.cpp" in r.err and "--text-only" in r.err, r.err
        r = run_cli("convert", case.path, destination, "--to", "gguf", "--text-only", "--quiet", *_flags(case))
        assert r.code == 0, r.err
        manifest = json.loads((destination / MANIFEST).read_text())
        written = sorted(p.name for p in destination.glob("*.gguf"))
        assert len(written) == 1 and not written[0].startswith("mmproj"), written  # the language model alone
        assert written == sorted(n for n in manifest["files"] if n.endswith(".gguf"))
    elif "gguf" in case.family.FORMS[found.form]:
        assert r.code == 0, r.err
        written = sorted(p.name for p in destination.glob("*.gguf"))
        manifest = json.loads((destination / MANIFEST).read_text())
        assert written and written == sorted(n for n in manifest["files"] if n.endswith(".gguf"))
    else:
        assert r.code == 1 and "Traceback" not in r.err
        assert str(case.path) in r.err and case.family.NAME in r.err and "GGUF" in r.err, r.err
        assert not destination.exists()
