"""The annotation loop (issue 16): several annotated slices, the review ranking, corrections that
redo only what can change, and the interactive protocol on real data (one patient, one organ)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from FoBSegmentLib import cli
from FoBSegmentLib import propagation as P
from FoBSegmentLib.evaluate.datasets import list_cases
from FoBSegmentLib.evaluate.interactive import (
    Loop,
    blind_pick,
    inner_slices,
    oracle_pick,
    ranked_pick,
    run_loop,
)
from FoBSegmentLib.evaluate.interpolation import evenly_spaced_slices
from FoBSegmentLib.evaluate.metrics import dice
from FoBSegmentLib.evaluate.propagation import prepare_volume, read_reference
from FoBSegmentLib.io import volumes
from FoBSegmentLib.job import Components, JobSettings, build_job
from FoBSegmentLib.propagation.review import review_ranking
from FoBSegmentLib.segmenters.graphcut import GraphCutSegmenter

LEFT_KIDNEY = 3


@pytest.fixture(scope="module")
def kidney(data_dir: Path) -> Loop:
    case = list_cases("chaos", ids=["2"])[0]
    prepared = prepare_volume(case.image)
    ref = read_reference(case.label, prepared) == LEFT_KIDNEY
    zs = np.flatnonzero(ref.any(axis=(1, 2)))
    return Loop("chaos", "2", LEFT_KIDNEY, prepared, ref, int(zs[0]), int(zs[-1]))


def job_for(loop: Loop, slices: list[int], absent: tuple[int, ...] = (), config: P.PropagationConfig | None = None):
    support = np.zeros(loop.ref.shape, bool)
    for z in slices:
        support[z] = loop.ref[z]
    comps = Components(None, GraphCutSegmenter(), "neighbour")
    return build_job(loop.prepared, support, JobSettings(prompts_from="neighbour", config=config), components=comps,
                     absent_slices=absent)


def test_a_correction_redoes_only_the_chains_it_changes(kidney: Loop) -> None:
    middle = (kidney.first + kidney.last) // 2
    first = job_for(kidney, [middle]).run()
    # An annotated absence above the organ cuts the upper chain only.
    cut = max(z for z, r in first.slices.items() if r.source == "neighbour") - 1
    full = job_for(kidney, [middle], absent=(cut,)).run()
    again = job_for(kidney, [middle], absent=(cut,)).run(previous=first)
    assert np.array_equal(full.mask, again.mask)  # reuse changes nothing
    assert again.segmented_count < full.segmented_count, (again.segmented_count, full.segmented_count)
    below = [z for z, r in again.slices.items() if z < middle and r.source == "neighbour"]
    assert below and all(again.slices[z].chain == first.slices[z].chain for z in below)
    # A new slice showing the organ changes the appearance learnt from the annotations: every chain
    # can change, so nothing is taken over, and the result is still the full propagation's.
    extra = kidney.last - 1
    full2 = job_for(kidney, [middle, extra]).run()
    again2 = job_for(kidney, [middle, extra]).run(previous=first)
    assert np.array_equal(full2.mask, again2.mask) and again2.segmented_count == full2.segmented_count


def test_a_sliver_drawn_ahead_does_not_empty_the_gap_before_it() -> None:
    """CHAOS MR 34's left kidney drawn on slice 11 (1078 px) and on slice 18, a sliver of 6 px at its
    lower tip. The chain from 11 towards 18 is held within reach of the annotation ahead; around that
    sliver the reach missed the kidney's body and the chain vanished on its first step, leaving slices
    12-17 empty: 0.909 from slice 11 alone, 0.690 with slice 18 too. Held to that cone alone
    (`gap_reach_cap` off), the chain now goes on without the reach where the reach would lose the
    organ (0.917), and the record says so; with the cap of the organ's end from the parent's extent
    (the default), the reach holds the kidney's body and the gap is filled within it."""
    case = list_cases("chaos", ids=["34"])[0]
    prepared = prepare_volume(case.image)
    ref = read_reference(case.label, prepared) == LEFT_KIDNEY
    zs = np.flatnonzero(ref.any(axis=(1, 2)))
    loop = Loop("chaos", "34", LEFT_KIDNEY, prepared, ref, int(zs[0]), int(zs[-1]))
    assert ref[18].sum() < 20 < ref[11].sum()
    one = job_for(loop, [11]).run()
    for cap in (False, True):
        job = job_for(loop, [11, 18], config=P.PropagationConfig(gap_reach_cap=cap))
        two = job.run()
        assert all(two.slices[z].source == "neighbour" and two.slices[z].area > 0 for z in range(12, 18))
        assert (two.slices[12].ahead is None) is not cap  # without the cap, the step went on without the reach
        assert dice(two.mask, ref) >= dice(one.mask, ref) - 0.005, (cap, dice(one.mask, ref), dice(two.mask, ref))
        assert np.array_equal(job.with_prompts(two.prompts, two.record).run().mask, two.mask)


def test_the_back_check_judges_an_annotated_slice_as_the_segmenter_draws_it() -> None:
    """Synapse CT 7's right kidney (a crescent of about 100-400 px a slice) from its middle slice 23.
    The back-check segments the slice a step comes from again, from the new mask, and compares. From
    the annotated slice it compared with the hand-drawn outline, which no graph cut gives back
    exactly: 0.67 under CT's 0.7, and the chain ended at its first step (slices 24-32 empty, Dice
    0.394). Compared with the annotation as the segmenter draws it, the chain goes on (0.582)."""
    case = list_cases("synapse", ids=["7"])[0]
    prepared = prepare_volume(case.image)
    ref = read_reference(case.label, prepared) == 2
    zs = np.flatnonzero(ref.any(axis=(1, 2)))
    loop = Loop("synapse", "7", 2, prepared, ref, int(zs[0]), int(zs[-1]))
    result = job_for(loop, [23]).run()
    assert not any("back-check (slice 23 " in n for n in result.notes), result.notes
    assert result.segmented[1] >= 28 and dice(result.mask, ref) >= 0.5, (result.segmented, dice(result.mask, ref))


def test_an_organ_bulging_between_two_overlapping_annotations_is_chained_not_interpolated() -> None:
    """Synapse CT 5's liver drawn on slices 33 (7493 px) and 51 (5071 px): the two outlines overlap
    (Dice >= 0.5), and the shape interpolated between them stayed near their size while the liver
    between them grows to 9300 px (0.846, against 0.908 from slice 33 alone). The gap is now chained
    from the larger annotation, as from one slice (0.911)."""
    case = list_cases("synapse", ids=["5"])[0]
    prepared = prepare_volume(case.image)
    ref = read_reference(case.label, prepared) == 1
    zs = np.flatnonzero(ref.any(axis=(1, 2)))
    loop = Loop("synapse", "5", 1, prepared, ref, int(zs[0]), int(zs[-1]))
    assert dice(ref[33], ref[51]) >= 0.5 and ref[33:52].sum(axis=(1, 2)).max() > 1.2 * ref[33].sum()
    one = dice(job_for(loop, [33]).run().mask, ref)
    two = job_for(loop, [33, 51]).run()
    assert {two.slices[z].source for z in range(34, 51)} == {"neighbour"}
    assert dice(two.mask, ref) >= one - 0.005, (one, dice(two.mask, ref))


def test_an_annotated_absence_stops_the_chain(kidney: Loop) -> None:
    middle = (kidney.first + kidney.last) // 2
    stop = middle + 2
    res = job_for(kidney, [middle], absent=(stop,)).run()
    assert not res.mask[stop:].any()
    assert res.slices[stop].source == "annotation"


def test_review_ranking_lists_every_segmented_slice_and_never_reads_the_reference(kidney: Loop) -> None:
    middle = (kidney.first + kidney.last) // 2
    res = job_for(kidney, [middle]).run()
    items = review_ranking(res)
    segmented = {z for z, r in res.slices.items() if r.source == "neighbour" and r.area > 0}
    assert {it.index for it in items} == segmented and middle not in {it.index for it in items}
    assert [it.score for it in items] == sorted((it.score for it in items), reverse=True)
    assert all(0.0 <= it.score <= 1.0 and it.reason for it in items)
    # The same image and annotation with another reference elsewhere: the same ranking (the loop's
    # first pick included), since neither the pipeline nor the ranking gets the reference.
    other = Loop(kidney.dataset, kidney.case_id, kidney.organ, kidney.prepared, kidney.ref.copy(),
                 kidney.first, kidney.last)
    other.ref[: middle] = False
    other.ref[middle + 1 :] = True
    res2 = job_for(other, [middle]).run()
    assert [it.to_json() for it in review_ranking(res2)] == [it.to_json() for it in items]
    assert ranked_pick(res2, [middle]) == ranked_pick(res, [middle])


def _result(areas: dict[int, int], annotated: list[int], agreement: dict[int, float] | None = None
            ) -> P.PropagationResult:
    reports = {z: P.SliceReport(z, "annotation" if z in annotated else ("neighbour" if a else "skipped"), area=a,
                                agreement=(agreement or {}).get(z, 0.9))
               for z, a in areas.items()}
    return P.PropagationResult(np.zeros((len(areas), 4, 4), np.uint8), {}, reports, 0, "neighbour")


def test_the_ranking_goes_where_a_correction_removes_most_error() -> None:
    # An organ on slices 0..30, annotated on slice 8: its large cross-sections lie on 14..24.
    areas = {z: int(100 + 900 * np.exp(-((z - 19) / 6.0) ** 2)) for z in range(31)}
    items = review_ranking(_result(areas, [8]))
    first = items[0].index
    assert 16 <= first <= 24, [it.to_json() for it in items[:3]]
    assert "estimated error" in items[0].reason and "agree 0.90" in items[0].reason
    # Between two annotations the middle of the gap beats the slices next to them.
    mid = review_ranking(_result(areas, [8, 28]))
    assert 15 <= mid[0].index <= 21 and {8, 28}.isdisjoint(it.index for it in mid)
    # Of two equal stretches, the slice its neighbours do not confirm comes first.
    flat = {z: 500 for z in range(21)}
    doubt = review_ranking(_result(flat, [10], {z: (0.5 if z == 4 else 0.95) for z in flat}))
    assert doubt[0].index == 4
    # Confirmed everywhere: nothing to remove, the slice farthest from the annotation first.
    sure = review_ranking(_result(flat, [10], {z: 1.0 for z in flat}))
    assert sure[0].index == 0 and sure[0].score == 0.0


def test_a_slice_its_neighbours_do_not_confirm_ranks_first(kidney: Loop) -> None:
    """CHAOS MR 2's left kidney: the reference moved onto its neighbour agrees with it, a shifted mask
    does not; a result with one slice shifted puts that slice (or one beside it) first."""
    from FoBSegmentLib.propagation.motion import agreements, neighbour_agreement

    img, ref = kidney.prepared.normalised, kidney.ref
    z = (kidney.first + kidney.last) // 2 + 2
    true = neighbour_agreement(ref[z], img[z], ref[z + 1], img[z + 1])
    shifted = neighbour_agreement(np.roll(ref[z], 8, axis=1), img[z], ref[z + 1], img[z + 1])
    assert true >= 0.85 and shifted <= true - 0.1, (true, shifted)  # measured 0.935, 0.768
    assert neighbour_agreement(np.zeros_like(ref[z]), img[z], np.zeros_like(ref[z]), img[z]) is None
    middle = (kidney.first + kidney.last) // 2
    result = job_for(kidney, [middle]).run()
    assert all(result.slices[w].agreement is not None for w in range(kidney.first, kidney.last + 1)
               if result.slices[w].area > 0)
    bad = middle + 3
    result.mask[bad] = np.roll(result.mask[bad], 10, axis=1)
    for w, value in agreements(result.mask, img, kidney.prepared.axis).items():
        result.slices[w].agreement = value
    assert abs(review_ranking(result)[0].index - bad) <= 1, review_ranking(result)[:3]
    # With --slices, a slice outside the range is no neighbour: the range's last slice is judged by
    # the slice before it alone (the organ goes on past the range; its empty mask there says nothing).
    lo, hi = middle - 2, middle + 2
    inside = agreements(result.mask, img, kidney.prepared.axis, (lo, hi))
    assert set(inside) == set(range(lo, hi + 1))
    assert inside[hi] == neighbour_agreement(result.mask[hi], img[hi], result.mask[hi - 1], img[hi - 1]) > 0.5


def test_blind_and_inner_picks() -> None:
    assert blind_pick([10], (4, 20)) == 16  # the larger run 11..20, its middle rounded up
    assert blind_pick([10, 15], (10, 15)) == 13
    assert blind_pick([3, 4, 5], (3, 5)) is None
    assert inner_slices(3, 16, 1) == [10] and inner_slices(3, 16, 3) == [5, 10, 14]


def test_interactive_protocol_two_rounds_on_a_real_patient(kidney: Loop) -> None:
    comps = Components(None, GraphCutSegmenter(), "neighbour")
    rec = run_loop(kidney, comps, None, rounds=2, even_counts=[1, 2, 3])
    for row in ("ranked", "blind", "prompts"):
        assert len(rec[row]) == 3 and all(0.0 <= d <= 1.0 for d in rec[row])
    assert len(rec["ranked_slices"]) == 3 and len(set(rec["ranked_slices"])) == 3
    assert set(rec["even"]) == {"1", "2", "3"} and set(rec["fill_even"]) == {"2", "3"}
    assert len(rec["fill_ranked"]) == 2
    # Round 0 is the same one-slice propagation for every strategy.
    assert rec["ranked"][0] == rec["blind"][0] == rec["prompts"][0] == rec["even_inner"]["1"]
    print(f"\nCHAOS 2 left kidney, ranked {rec['ranked']}, blind {rec['blind']}, prompts {rec['prompts']}")


def test_the_oracle_annotator_draws_the_slice_most_wrong_and_only_when_asked(kidney: Loop) -> None:
    """The analysis row `oracle` (it reads the reference by design) draws, each round, the unannotated
    slice whose result differs most from the reference; the default strategies leave it out."""
    from FoBSegmentLib.evaluate.interactive import _job, _strategies

    comps = Components(None, GraphCutSegmenter(), "neighbour")
    rec = run_loop(kidney, comps, None, rounds=1, even_counts=[1], strategies=("oracle",))
    assert set(rec) >= {"oracle", "oracle_slices"} and "ranked" not in rec
    start = rec["oracle_slices"][0]
    result = _job(kidney, {start: kidney.draw(start)}, comps, None).run()
    wrong = {z: int(np.count_nonzero(result.mask[z] ^ kidney.ref[z])) for z in range(kidney.ref.shape[0])}
    pick = oracle_pick(result, kidney, [start])
    assert pick != start and wrong[pick] == max(v for z, v in wrong.items() if z != start) > 0
    assert rec["oracle_slices"][1] == pick and rec["oracle"][1] > rec["oracle"][0]
    assert "oracle" not in _strategies(None) and _strategies(["oracle", "ranked"]) == ("ranked", "oracle")


def test_interactive_command_writes_json_plot_and_section(tmp_path: Path, capsys) -> None:
    out, png, md = tmp_path / "i.json", tmp_path / "i.png", tmp_path / "R.md"
    rc = cli.main(["evaluate", "--protocol", "interactive", "--dataset", "chaos", "--cases", "2", "--organs", "3",
                   "--rounds", "1", "--prompts-from", "neighbour", "--quiet", "--json", str(out), "--plot", str(png),
                   "--markdown", str(md)])
    assert rc == 0, capsys.readouterr().err
    doc = json.loads(out.read_text())
    assert doc["summary"]["chaos"]["cases"] == 1 and len(doc["records"]) == 1
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = md.read_text()
    assert "<!-- interactive:start -->" in text and "Targets:" in text
    # A subset of the strategies into its own section, then two reports merged without evaluating.
    part = tmp_path / "part.json"
    rc = cli.main(["evaluate", "--protocol", "interactive", "--dataset", "chaos", "--cases", "2", "--organs", "3",
                   "--rounds", "1", "--prompts-from", "neighbour", "--quiet", "--strategies", "blind",
                   "--json", str(part), "--markdown", str(md), "--section", "interactive-blind"])
    assert rc == 0, capsys.readouterr().err
    assert set(json.loads(part.read_text())["records"][0]) >= {"blind"}
    assert "ranked" not in json.loads(part.read_text())["records"][0]
    assert "<!-- interactive-blind:start -->" in md.read_text() and "<!-- interactive:start -->" in md.read_text()
    merged = tmp_path / "merged.json"
    assert cli.main(["evaluate", "--protocol", "interactive", "--from-json", str(out), str(part),
                     "--json", str(merged)]) == 0
    # The same loop in both: one record, the later report's blind row over the earlier one's.
    (rec,) = json.loads(merged.read_text())["records"]
    first, later = json.loads(out.read_text())["records"][0], json.loads(part.read_text())["records"][0]
    assert rec["blind"] == later["blind"] and rec["ranked"] == first["ranked"] and rec["even"] == first["even"]
    assert rec["seconds"] == round(first["seconds"] + later["seconds"], 1)
    capsys.readouterr()
    assert cli.main(["evaluate", "--protocol", "interactive", "--strategies", "psychic", "--dataset", "chaos"]) == 2
    assert "--strategies" in capsys.readouterr().err


def test_review_out_file_and_bad_paths(tmp_path: Path, data_dir: Path, capsys) -> None:
    lab = volumes.read_label(data_dir / "chaos_mr_t2spir" / "label_2.nii.gz")
    ref = lab.array == LEFT_KIDNEY
    zs = np.flatnonzero(ref.any(axis=(1, 2)))
    sup = np.zeros(ref.shape, np.uint8)
    sup[zs[len(zs) // 2]] = ref[zs[len(zs) // 2]]
    support = volumes.write_label(tmp_path / "s.nii.gz", sup, lab.geometry)
    image = data_dir / "chaos_mr_t2spir" / "image_2.nii.gz"
    base = ["segment", str(image), "-o", str(tmp_path / "o.nii.gz"), "--support-mask", str(support), "--quiet"]
    assert cli.main([*base, "--review-out", str(tmp_path / "review.json")]) == 0
    doc = json.loads((tmp_path / "review.json").read_text())
    idx = [s["index"] for s in doc["slices"]]
    assert idx and zs[len(zs) // 2] not in idx and all(set(s) == {"index", "score", "reason"} for s in doc["slices"])
    capsys.readouterr()
    same = tmp_path / "p.mrk.json"
    for bad, fragment, extra in ((tmp_path / "missing" / "r.json", "does not exist", []),
                                 (tmp_path / "r.txt", "must end in .json", []),
                                 (same, "another output", ["--prompts-out", str(same)])):
        (tmp_path / "o.nii.gz").unlink(missing_ok=True)
        rc = cli.main([*base, *extra, "--review-out", str(bad)])
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("fob: error:")]
        assert rc == 2 and len(lines) == 1 and fragment in lines[0] and "--review-out" in lines[0], err
        assert not (tmp_path / "o.nii.gz").exists()


def test_three_annotated_slices_beat_one(kidney: Loop) -> None:
    one = job_for(kidney, [(kidney.first + kidney.last) // 2]).run()
    three = job_for(kidney, inner_slices(kidney.first, kidney.last, 3)).run()
    assert dice(three.mask, kidney.ref) > dice(one.mask, kidney.ref)


def _drawn_on_its_ends(case_id: str, organ: int, dataset: str = "chaos") -> tuple:
    """Case `case_id` of `dataset` (CHAOS MR by default): (prepared volume, the organ's reference, the
    slices it is on, a support with only its first and last slice drawn)."""
    case = list_cases(dataset, ids=[case_id])[0]
    prepared = prepare_volume(case.image)
    ref = read_reference(case.label, prepared) == organ
    zs = np.flatnonzero(ref.any(axis=(1, 2)))
    support = np.zeros(ref.shape, bool)
    support[[zs[0], zs[-1]]] = ref[[zs[0], zs[-1]]]
    return prepared, ref, zs, support


def _neighbour_job(prepared, support: np.ndarray, cfg: P.PropagationConfig | None = None, presets: bool = True):
    """The job that chains `support` through `prepared` with graphcut and no model; presets=False:
    `cfg` as given, without the modality's presets on the fields left at their defaults."""
    return build_job(prepared, support, JobSettings(prompts_from="neighbour", config=cfg, modality_presets=presets),
                     components=Components(None, GraphCutSegmenter(), "neighbour"))


def test_two_tips_grow_into_the_organ_between_them(data_dir: Path) -> None:
    """CHAOS MR 8's right kidney drawn on its first and last slice only: the look learnt from the two
    tips calls most of the kidney's body background. Re-learnt at every step of the chain between
    them (`relearn_gap_look`), the chain grows into it; stepping as a chain from a tip (`tip_ratio`:
    the look from the slice being segmented, softer growth, the reach of the annotation ahead), more;
    chained again from where the tip chains from both ends agree (`tip_consensus`), more still. With
    the prior left where it lay, as measured then: moved with the organ (`moved_prior`, not on a tip
    chain's steps) the plain chain between the tips already reaches 0.884 on this kidney, above the
    tip chains' 0.847 (over all loops drawn on their two end slices the tip chains still win:
    docs/RESULTS.md, "Tuning notes", `moved_prior`)."""
    prepared, ref, zs, support = _drawn_on_its_ends("8", 2)
    got, looks = {}, {}
    for name, cfg in (("once", P.PropagationConfig(relearn_gap_look=False, tip_ratio=None, moved_prior=False)),
                      ("parent", P.PropagationConfig(tip_ratio=None, moved_prior=False)),
                      ("tip", P.PropagationConfig(tip_consensus=None, body_seed=False, moved_prior=False)),
                      ("consensus", P.PropagationConfig(body_seed=False, moved_prior=False))):
        job = _neighbour_job(prepared, support, cfg)
        result = job.run()
        got[name] = dice(result.mask, ref)
        looks[name] = {rep.look for z, rep in result.slices.items() if zs[0] < z < zs[-1]}
        if name in ("tip", "consensus"):  # the prompts give the mask back (each step's look re-learnt)
            assert np.array_equal(job.with_prompts(result.prompts, result.record).run().mask, result.mask)
    print("\nCHAOS MR 8 right kidney from its two end slices: Dice " + " -> ".join(f"{v:.3f}" for v in got.values()))
    assert looks == {"once": {"annotations"}, "parent": {"parent"}, "tip": {"tip"},
                     "consensus": {"annotations", "parent"}}  # the seed where the two agree: its own mask
    assert got["parent"] >= got["once"] + 0.3  # measured 0.167 -> 0.749
    assert got["tip"] >= got["parent"] + 0.05  # measured 0.749 -> 0.847
    assert got["consensus"] >= got["tip"] + 0.02  # measured 0.847 -> 0.881


def test_the_chain_again_from_where_the_tips_agree_shrinks_into_each_end(data_dir: Path) -> None:
    """Synapse CT 5's spleen drawn on its end slices (25 and 224 px; up to 1337 px between them): the
    chain run again from where the two tip chains agree fails an end rule at every step towards the
    upper end, and between two annotations no rule ends it, so without a bound it keeps the spleen's
    full size up to the 25 px annotation. Held to `tip_reach` px per slice of the annotation ahead
    (`gap_reach`), it shrinks into it. With the wider cap of a smooth organ's end (`gap_reach_cap`,
    the default) the steps that fail an end rule are held to the cone: it shrinks into it too, and
    the record, which marks those steps, gives the mask back."""
    prepared, ref, zs, support = _drawn_on_its_ends("5", 4, dataset="synapse")
    got, runs = {}, {}
    for name, cfg in (("unbounded", P.PropagationConfig(gap_reach=False, body_seed=False)),
                      ("cap", P.PropagationConfig(body_seed=False)),
                      ("reach", P.PropagationConfig(body_seed=False, gap_reach_cap=False))):
        job = _neighbour_job(prepared, support, cfg)
        runs[name] = job, job.run()
        got[name] = dice(runs[name][1].mask, ref)
    print("\nSynapse CT 5 spleen from its two end slices: Dice unbounded, cap, cone "
          + " / ".join(f"{v:.3f}" for v in got.values()))
    reach = P.PropagationConfig().tip_reach
    job, result = runs["reach"]
    parent = [(z, rep) for z, rep in result.slices.items() if rep.look == "parent"]
    assert parent and all(rep.ahead in (zs[0], zs[-1]) for _, rep in parent)
    for z, rep in parent:  # every step lies in the cone of the annotation ahead
        far = ndimage.distance_transform_edt(~support[rep.ahead]) > reach * abs(z - rep.ahead)
        assert not (result.mask[z] & far).any()
    assert got["reach"] >= got["unbounded"] + 0.05  # measured 0.677 -> 0.784
    assert got["cap"] >= got["unbounded"] + 0.05  # measured 0.679 -> 0.786
    # The record carries each step's annotation ahead and reach: the prompts give the mask back.
    for job, result in (runs["reach"], runs["cap"]):
        assert np.array_equal(job.with_prompts(result.prompts, result.record).run().mask, result.mask)
    assert any(rep.cone for rep in runs["cap"][1].slices.values())


def test_a_chain_past_the_outermost_annotation_learns_the_look_from_it_alone(data_dir: Path) -> None:
    """CHAOS MR 39's left kidney drawn on 3 slices spread over it (its ends left out): with the look
    pooled from all three, the chains outward from the outermost ones run on past the kidney's ends
    (9715 px segmented on slices without kidney); learnt from each one's own slice
    (`outward_own_look`), they stop near where the kidney ends. With the prior left where it lay, as
    measured then: moved with the organ (`moved_prior`), both chains follow the kidney better and the
    gap shrinks (0.676 -> 0.702)."""
    case = list_cases("chaos", ids=["39"])[0]
    prepared = prepare_volume(case.image)
    ref = read_reference(case.label, prepared) == LEFT_KIDNEY
    zs = np.flatnonzero(ref.any(axis=(1, 2)))
    drawn = inner_slices(int(zs[0]), int(zs[-1]), 3)
    support = np.zeros(ref.shape, bool)
    support[drawn] = ref[drawn]
    got, beyond = {}, {}
    for name, own in (("pooled", False), ("own", True)):
        cfg = P.config_for_modality(P.PropagationConfig(outward_own_look=own, moved_prior=False), prepared.modality)
        job = _neighbour_job(prepared, support, cfg)
        result = job.run()
        got[name] = dice(result.mask, ref)
        beyond[name] = int(result.mask[zs[-1] + 1:].sum() + result.mask[:zs[0]].sum())
    outward = {z: rep.look for z, rep in result.slices.items() if rep.source == "neighbour" and not drawn[0] < z < drawn[-1]}
    assert outward and set(outward.values()) == {"own"}
    # The record names each step's look: the prompts give the mask back.
    assert np.array_equal(job.with_prompts(result.prompts, result.record).run().mask, result.mask)
    print(f"\nCHAOS MR 39 left kidney from slices {drawn}: Dice {got['pooled']:.3f} -> {got['own']:.3f}, "
          f"px beyond the kidney {beyond['pooled']} -> {beyond['own']}")
    assert got["own"] >= got["pooled"] + 0.05
    assert beyond["own"] < beyond["pooled"]


def test_a_small_organs_middle_slice_is_no_tip(data_dir: Path) -> None:
    """Synapse CT 7's right kidney is small (100 px on its middle slice, radius about 7 mm, under a
    quarter of the 30 mm to either end). Drawn on its ends and middle, the chains from the middle are
    no tip chains: annotated slices lie on both sides of it (as a tip chain it leaked to 7x the
    organ's area)."""
    case = list_cases("synapse", ids=["7"])[0]
    prepared = prepare_volume(case.image)
    ref = read_reference(case.label, prepared) == 2
    zs = np.flatnonzero(ref.any(axis=(1, 2)))
    picks = evenly_spaced_slices(int(zs[0]), int(zs[-1]), 3)  # as the annotation loop spreads them
    support = np.zeros(ref.shape, bool)
    support[picks] = ref[picks]
    looks = {rep.look for z, rep in _neighbour_job(prepared, support).run().slices.items() if picks[0] < z < picks[-1] and z not in picks}
    assert looks == {"parent"}


def test_an_end_slice_where_the_organ_ends_is_a_tip_whatever_its_size(data_dir: Path) -> None:
    """CHAOS MR 5's spleen drawn on its first and last slice (304 and 1234 px; 3368 px between them):
    the last is too large against the gap for `tip_ratio`, yet the chain outward from it stops after
    a slice (the organ ends there, `tip_end`). Stepping as a tip chain, the chain between them grows
    into the spleen; as a plain gap chain it shrinks away from it."""
    prepared, ref, zs, support = _drawn_on_its_ends("5", 4)
    got, looks = {}, {}
    for name, cfg in (("size only", P.PropagationConfig(tip_end=None, tip_consensus=None)),
                      ("end", P.PropagationConfig(tip_consensus=None, body_seed=False))):
        result = _neighbour_job(prepared, support, cfg).run()
        got[name] = dice(result.mask, ref)
        looks[name] = {rep.look for z, rep in result.slices.items() if zs[0] < z < zs[-1]}
    print("\nCHAOS MR 5 spleen from its two end slices: Dice " + " -> ".join(f"{v:.3f}" for v in got.values()))
    assert looks == {"size only": {"parent"}, "end": {"tip"}}
    assert got["end"] >= got["size only"] + 0.3


def test_two_ends_that_overlap_are_tips_not_an_interpolated_gap(data_dir: Path) -> None:
    """CHAOS MR 1's left kidney drawn on its first and last slice, with interpolated gaps on (off by
    default): the two masks overlap (Dice >= `interpolate_agreement`), yet the kidney between them is
    several times their size. Its ends are the organ's tips, so the gap is chained from them (tip
    chains) rather than filled with the shape interpolated between two tips, which stays tip-sized."""
    prepared, ref, zs, support = _drawn_on_its_ends("1", LEFT_KIDNEY)
    interpolating = P.PropagationConfig(interpolate_agreement=0.5)
    assert dice(support[zs[0]], support[zs[-1]]) >= interpolating.interpolate_agreement
    got, sources = {}, {}
    for name, cfg in (("no tips", P.PropagationConfig(tip_ratio=None, interpolate_agreement=0.5)),
                      ("tips", interpolating)):
        result = _neighbour_job(prepared, support, cfg).run()
        got[name] = dice(result.mask, ref)
        sources[name] = {rep.source for z, rep in result.slices.items() if zs[0] < z < zs[-1]}
    print("\nCHAOS MR 1 left kidney from its two end slices: Dice " + " -> ".join(f"{v:.3f}" for v in got.values()))
    assert sources == {"no tips": {"interpolated"}, "tips": {"neighbour"}}
    assert got["tips"] >= got["no tips"] + 0.3  # measured 0.467 -> 0.908


def test_a_tip_chain_that_vanishes_in_its_gap_is_chained_again_from_its_largest_slice(data_dir: Path) -> None:
    """CHAOS MR 3's left kidney drawn on its end slices (365 px above, a 6 px fragment below): the tip
    chain from the upper end shrinks away and vanishes three slices on, the one from the lower end
    too; the two never meet. The organ does not end between two annotated slices, so the gap is
    chained again, as a chain that follows a shrinking organ, from the first chain's largest slice."""
    prepared, ref, zs, support = _drawn_on_its_ends("3", LEFT_KIDNEY)
    got = {}
    for name, cfg in (("tip", P.PropagationConfig(tip_consensus=None, body_seed=False)),
                      ("again", P.PropagationConfig(body_seed=False))):
        result = _neighbour_job(prepared, support, cfg).run()
        got[name] = dice(result.mask, ref)
    print("\nCHAOS MR 3 left kidney from its two end slices: Dice " + " -> ".join(f"{v:.3f}" for v in got.values()))
    seeds = [rep for rep in result.slices.values() if rep.prior == "self"]
    assert len(seeds) == 1 and "vanished" in seeds[0].flags[0]
    assert got["again"] >= got["tip"] + 0.3  # measured 0.156 -> 0.569


def test_the_reach_of_a_domed_organs_end_is_a_cap_not_a_cone(data_dir: Path) -> None:
    """Synapse CT 15's liver drawn on its first and last slice only: the chains from the body seed
    towards the end annotations are held to their reach. A cone of `tip_reach` px a slice from the
    small annotation at the liver's top cuts the dome's last slices well inside the organ; the cap of
    a smooth organ's end, from the parent slice's extent (`gap_reach_cap`), keeps them, and some
    steps reach beyond the cone. The record gives the mask back."""
    prepared, ref, zs, support = _drawn_on_its_ends("15", 1, dataset="synapse")
    got = {}
    for on in (False, True):
        job = _neighbour_job(prepared, support, P.PropagationConfig(gap_reach_cap=on))
        result = job.run()
        got[on] = dice(result.mask, ref)
    print(f"\nSynapse CT 15 liver from its two end slices: Dice cone {got[False]:.3f} -> cap {got[True]:.3f}")
    assert got[True] >= got[False] + 0.015  # measured 0.864 -> 0.888
    cone = P.PropagationConfig().tip_reach
    beyond = [z for z, rep in result.slices.items() if rep.look == "parent" and rep.ahead is not None
              and (result.accepted[z] & (ndimage.distance_transform_edt(~support[rep.ahead])
                                         > cone * abs(z - rep.ahead))).any()]
    assert beyond
    assert np.array_equal(job.with_prompts(result.prompts, result.record).run().mask, result.mask)


def test_a_body_seed_between_two_tips_brings_the_organs_look(data_dir: Path) -> None:
    """CHAOS MR 2's spleen drawn on its first and last slice only: both are tips, and the look learnt
    from them is partial volume. The slice midway between them, as the first pass chained it, joins
    them as a body seed (`body_seed`): the propagation runs again with its look learnt too and the
    gap filled from it. Segmented again from its own mask (`body_seed_refine`), the body seed grows
    to the organ's edge the first pass's tip chains lagged behind. The record stores its mask and the
    prompts give the result back; the body seed is no annotation, so the review ranking lists it.
    With a third annotated slice (the middle) no body seed is made."""
    prepared, ref, zs, support = _drawn_on_its_ends("2", 4)
    got, seed = {}, {}
    for name, on, rounds in (("tips", False, 0), ("body seed", True, 0), ("refined", True, 5)):
        cfg = P.PropagationConfig(body_seed=on, body_seed_refine=rounds)
        job = _neighbour_job(prepared, support, P.config_for_modality(cfg, "mr"))
        result = job.run()
        got[name] = dice(result.mask, ref)
        body = [z for z, rep in result.slices.items() if rep.look == "body"]
        seed[name] = dice(result.accepted[body[0]], ref[body[0]]) if body else None
    print("\nCHAOS MR 2 spleen from its two end slices: Dice " + " -> ".join(f"{v:.3f}" for v in got.values())
          + f"; body seed {seed['body seed']:.3f} -> {seed['refined']:.3f} refined")
    assert body == [(zs[0] + zs[-1]) // 2] and result.slices[body[0]].prior == "self"
    assert {rep.look for z, rep in result.slices.items() if zs[0] < z < zs[-1] and z not in body} == {"parent"}
    assert body[0] in [item.index for item in review_ranking(result)]
    assert got["body seed"] >= got["tips"] + 0.05  # measured 0.709 -> 0.804
    assert seed["refined"] >= seed["body seed"] + 0.02 and got["refined"] >= got["body seed"] + 0.02
    assert np.array_equal(job.with_prompts(result.prompts, result.record).run().mask, result.mask)
    support[body[0]] = ref[body[0]]
    assert not any(rep.look == "body" for rep in _neighbour_job(prepared, support).run().slices.values())


def test_a_body_seed_in_two_pieces_keeps_the_one_between_the_tips(data_dir: Path) -> None:
    """Synapse CT 11's spleen drawn on its first and last slice only: the tip chains run into the
    stomach, and the body seed's rounds split it into the spleen and a larger piece on the stomach.
    The piece nearest the two tips' mean centre is kept (`body_seed_one_piece`), with the foreground
    points that lie on it; the record's replay gives the result back."""
    prepared, ref, zs, support = _drawn_on_its_ends("11", 4, "synapse")
    got, pieces = {}, {}
    for on in (False, True):
        cfg = P.config_for_modality(P.PropagationConfig(body_seed_one_piece=on), "ct")
        cfg.body_seed_trim = None  # the CT preset's trimmed rounds: the next test
        job = _neighbour_job(prepared, support, cfg, presets=False)
        result = job.run()
        body = [z for z, rep in result.slices.items() if rep.look == "body"]
        assert len(body) == 1
        got[on] = dice(result.mask, ref)
        pieces[on] = ndimage.label(result.accepted[body[0]])[1]
    print(f"\nSynapse CT 11 spleen from its two end slices: Dice {got[False]:.3f} -> {got[True]:.3f}, "
          f"body seed pieces {pieces[False]} -> {pieces[True]}")
    assert pieces[False] > 1 and pieces[True] == 1
    assert got[True] >= got[False] + 0.2  # measured 0.537 -> 0.924 in the protocol's job
    fg = np.round(result.prompts[body[0]].foreground).astype(int)
    assert len(fg) and result.accepted[body[0]][fg[:, 1], fg[:, 0]].all()
    assert np.array_equal(job.with_prompts(result.prompts, result.record).run().mask, result.mask)


def test_a_body_seed_trimmed_to_the_organs_intensities_lets_go_of_a_leak(data_dir: Path) -> None:
    """Synapse CT 15's spleen drawn on its first and last slice only: the body seed grown from the
    tips holds the spleen and a leak onto the stomach wall beside it, which its rounds learn as organ.
    Segmented again with its look trimmed (`body_seed_trim`, the CT preset), the pixels of other
    intensities learnt as surroundings, the leak goes and the organ stays."""
    prepared, ref, zs, support = _drawn_on_its_ends("15", 4, "synapse")
    got, seed = {}, {}
    for trim in (None, 2.5):
        cfg = P.config_for_modality(P.PropagationConfig(), "ct")
        assert cfg.body_seed_trim == 2.5
        cfg.body_seed_trim = trim
        job = _neighbour_job(prepared, support, cfg, presets=False)
        result = job.run()
        body = [z for z, rep in result.slices.items() if rep.look == "body"]
        m, r = result.accepted[body[0]], ref[body[0]]
        got[trim], seed[trim] = dice(result.mask, ref), (int(m.sum()), int((m & r).sum()), int(r.sum()))
    print(f"\nSynapse CT 15 spleen from its two end slices: Dice {got[None]:.3f} -> {got[2.5]:.3f}; body seed "
          f"(px, on the organ, organ) {seed[None]} -> {seed[2.5]}")
    assert got[2.5] >= got[None] + 0.04  # measured 0.856 -> 0.934 in the protocol's job
    (before, on_before, _), (after, on_after, _) = seed[None], seed[2.5]
    assert before - on_before > 2 * (after - on_after) and on_after >= 0.9 * on_before  # the leak goes
    assert np.array_equal(job.with_prompts(result.prompts, result.record).run().mask, result.mask)


def test_config_round_trip() -> None:
    cfg = P.config_for_modality(None, "mr")
    assert P.PropagationConfig.from_json(cfg.to_json()) == cfg
    # A record written before a field existed replays the way it ran then.
    newer = ("relearn_gap_look", "gap_reach", "outward_own_look", "body_seed", "cross_seed_one_piece", "moved_prior",
             "gap_reach_cap", "body_seed_redraw",
             "tip_ratio", "tip_end", "tip_consensus", "cross_min_extent", "cross_chunk_agreement")
    old = P.PropagationConfig.from_json({k: v for k, v in cfg.to_json().items() if k not in newer})
    assert all(getattr(cfg, k) is True and getattr(old, k) is False for k in newer[:8])
    assert all(getattr(cfg, k) is not None and getattr(old, k) is None for k in newer[8:])
    assert cfg.body_seed_refine > 0 and P.PropagationConfig.from_json(
        {k: v for k, v in cfg.to_json().items() if k != "body_seed_refine"}).body_seed_refine == 0
    assert cfg.body_seed_one_piece and not P.PropagationConfig.from_json(
        {k: v for k, v in cfg.to_json().items() if k != "body_seed_one_piece"}).body_seed_one_piece


def test_a_prompt_correction_segments_only_the_edited_slice_and_its_chain(kidney: Loop) -> None:
    from FoBSegmentLib.prompts import PromptSet

    middle = (kidney.first + kidney.last) // 2
    job = job_for(kidney, [middle])
    first = job.run()
    # The farthest chained slice that shows the organ: the person corrects it from the reference.
    z = max(z for z, r in first.slices.items() if r.source == "neighbour" and kidney.ref[z].any())
    made = P.prompts_from_mask(kidney.ref[z], job.config)
    prompts = dict(first.prompts)
    prompts[z] = PromptSet(made.background, made.foreground)
    fresh = job.with_prompts(prompts, first.record).run()
    quick = job.with_prompts(prompts, first.record).run(previous=first)
    assert np.array_equal(fresh.mask, quick.mask)
    # the slices below the edited one are taken over; only it and the chain beyond it run again
    assert quick.segmented_count < fresh.segmented_count, (quick.segmented_count, fresh.segmented_count)
