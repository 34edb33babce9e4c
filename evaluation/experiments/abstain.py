"""abstain: calibrated confidence, the risk-coverage curve, and telling out-of-memory queries apart.

A memory is built without the held-out classes. Its calibration split (in-memory classes only) is
evaluated and ``vmem calibrate`` fits and publishes the calibration (its default: a logistic fit on the
rank vote's share, margin and nearest similarity at k = 10).
The test split -- every class, so the held-out classes' queries are out of memory -- is then evaluated at
the calibrated version, and from its neighbour lists:

* ECE of the raw share and of the calibrated confidence on the in-memory queries (a split the calibration
  never saw), for every calibration method and score (fitted in-process, same code as ``vmem calibrate``);
* the risk-coverage curve: answer the most confident queries first; risk = wrong answers among those
  answered, an out-of-memory query being always wrong;
* AUROC of each score at telling in-memory from out-of-memory queries (1.0: perfectly separated).

Finally ``VisualMemory.classify(embeddings, abstain_below=P)`` runs on the test embeddings: its
abstentions must be exactly those the neighbour files predict.
"""

from __future__ import annotations

import os

import numpy as np

from evaluation import neighbors_io
from evaluation.experiments.common import pct, plot_lines, read_neighbors, write_report
from evaluation.experiments.workspace import Workspace, per_class_rows
from evaluation.stats import (auroc, coverage_at_risk, expected_calibration_error, reliability_bins,
                              risk_at_coverage, risk_coverage)

NAME = "abstain"
RULE, K = "rank", 10
THRESHOLDS = (0.5, 0.8, 0.9, 0.95)


def _calibrate(eval_dir: str, memory: str) -> None:
    """``vmem calibrate --evaluation EVAL_DIR --memory M --rule rank --k 10``: fit and publish (its defaults)."""
    from evaluation.calibration import fit_from_evaluation, read_evaluation  # pylint: disable=g-import-not-at-top
    from memory.decide.confidence import publish_calibration  # pylint: disable=g-import-not-at-top
    fit = fit_from_evaluation(read_evaluation(eval_dir), memory=memory, rule=RULE, k=K)
    publish_calibration(fit.root, fit.calibration, expected_version=fit.calibration.fitted_on_version)


def run(ws: Workspace, out: str) -> dict:
    from memory.decide.confidence import (CalibrationMethod, ConfidenceScore, fit_on_confidence,  # pylint: disable=g-import-not-at-top
                                   memory_calibration, raw_score, vote_confidence)
    from memory.store.versions import read_manifest  # pylint: disable=g-import-not-at-top
    from memory.visual_memory import VisualMemory  # pylint: disable=g-import-not-at-top
    s = ws.setup
    k = min(K, s.k_max)
    held = tuple(s.hold_out)
    train, calib, test = ws.table("train"), ws.table("calib"), ws.table("test")
    memory = ws.build("abstain", ws.write_table("abstain-train", train.take(~per_class_rows(train.labels, held))))
    _, calib_dir = ws.evaluate(memory, ws.write_table("abstain-calib", calib.take(~per_class_rows(calib.labels, held))),
                               "abstain-calib")
    _calibrate(calib_dir, memory)
    manifest = read_manifest(memory)
    calibration = memory_calibration(manifest)
    _, test_dir = ws.evaluate(memory, ws.split_spec("test"), "abstain-test")

    test_records = read_neighbors(test_dir)
    labels, distances, true, weights = neighbors_io.to_arrays(test_records, s.k_max)
    vc = vote_confidence(labels, distances, rule=RULE, k=k, entry_weights=weights)
    inside = true >= 0  # Query classes the memory does not know have true label -1.
    correct = (vc.labels == true) & inside
    calibrated = calibration.confidence(vc)
    c_labels, c_distances, c_true, c_weights = neighbors_io.to_arrays(read_neighbors(calib_dir), s.k_max)
    c_vc = vote_confidence(c_labels, c_distances, rule=RULE, k=k, entry_weights=c_weights)
    methods = {}
    for method in CalibrationMethod:
        for score in ConfidenceScore:
            if score is ConfidenceScore.COMBINED and method is CalibrationMethod.ISOTONIC:
                continue  # Isotonic maps one score; the combined score has three inputs.
            fit = fit_on_confidence(c_vc, c_true, rule=RULE, k=k, method=method, score=score)
            conf = fit.confidence(vc)
            raw = raw_score(vc, score)
            raw_prob = (raw + 1) / 2 if score is ConfidenceScore.SIMILARITY else raw
            methods[f"{method.value}:{score.value}"] = {
                "ece_raw": expected_calibration_error(raw_prob[inside], correct[inside]),
                "ece_calibrated": expected_calibration_error(conf[inside], correct[inside]),
                "auroc_in_vs_out": auroc(conf[inside], conf[~inside]),
                "aurc_all_queries": risk_coverage(conf, correct).aurc}
    scores = {"share": vc.share, "margin": vc.margin, "similarity": vc.similarity, "calibrated": calibrated}
    curves = {name: risk_coverage(v, correct) for name, v in scores.items()}
    in_curve = risk_coverage(calibrated[inside], correct[inside])
    gates = {}
    for p in THRESHOLDS:
        answered = calibrated >= p
        gates[str(p)] = {"coverage": float(answered.mean()),
                         "accuracy_of_answered": float(correct[answered].mean()) if answered.any() else None,
                         "out_of_memory_answered": int((answered & ~inside).sum()),
                         "in_memory_abstained": int((~answered & inside).sum())}
    # The Python API must abstain exactly where the neighbour lists say: same neighbours, same calibration.
    order = {qid: i for i, qid in enumerate(test.ids.tolist())}
    rows = np.asarray([order[r.query_id] for r in test_records])
    gate = THRESHOLDS[-2]
    predictions = VisualMemory.open(memory).classify(test.embeddings[rows], rule=RULE, k=k, abstain_below=gate)
    api_mismatches = int(sum(p.abstained != (c < gate) for p, c in zip(predictions, calibrated.tolist())))
    bins = reliability_bins(calibrated[inside], correct[inside])
    raw_bins = reliability_bins(vc.share[inside], correct[inside])
    results = {
        "held_out_classes": list(held), "rule": RULE, "k": k, "calibration": calibration.to_dict(),
        "queries": int(true.size), "in_memory_queries": int(inside.sum()), "out_of_memory_queries": int((~inside).sum()),
        "accuracy_in_memory": float(correct[inside].mean()),
        "ece_in_memory": {"raw_share": expected_calibration_error(vc.share[inside], correct[inside]),
                          "calibrated": expected_calibration_error(calibrated[inside], correct[inside])},
        "auroc_in_vs_out": {name: auroc(v[inside], v[~inside]) for name, v in scores.items()},
        "aurc_all_queries": {name: c.aurc for name, c in curves.items()},
        "aurc_in_memory_calibrated": in_curve.aurc,
        "risk_at_coverage_0.8": {name: risk_at_coverage(c, 0.8) for name, c in curves.items()},
        "coverage_at_risk_0.05": {name: coverage_at_risk(c, 0.05) for name, c in curves.items()},
        "abstain_below": gates, "api_abstain_mismatches": api_mismatches, "api_gate": gate,
        "methods": methods}
    os.makedirs(out, exist_ok=True)
    plot_lines(os.path.join(out, "risk_coverage.png"),
               {name: (c.coverage.tolist(), (100 * c.risk).tolist()) for name, c in curves.items()},
               xlabel="coverage (fraction of queries answered)", ylabel="risk (% of answers wrong)",
               title=f"{s.dataset}: risk-coverage, {', '.join(held)} out of memory")
    ok = bins.count > 0
    raw_ok = raw_bins.count > 0
    plot_lines(os.path.join(out, "reliability.png"), {
        "raw share": ((100 * raw_bins.mean_confidence[raw_ok]).tolist(), (100 * raw_bins.accuracy[raw_ok]).tolist()),
        "calibrated": ((100 * bins.mean_confidence[ok]).tolist(), (100 * bins.accuracy[ok]).tolist()),
        "perfect": ([0, 100], [0, 100])}, xlabel="confidence (%)", ylabel="accuracy (%)",
        title=f"{s.dataset}: reliability on in-memory test queries", styles={"perfect": ":"})
    lines = [f"Memory without {', '.join(held)}; calibration: {calibration.describe()}.", "",
             "| | raw share | calibrated |", "|---|---:|---:|",
             f"| ECE, in-memory test queries | {results['ece_in_memory']['raw_share']:.4f} | "
             f"{results['ece_in_memory']['calibrated']:.4f} |", "",
             "| score | AUROC in vs out of memory | AURC (all queries) | risk @ 80% coverage | coverage @ 5% risk |",
             "|---|---:|---:|---:|---:|"]
    for name in scores:
        lines.append(f"| {name} | {results['auroc_in_vs_out'][name]:.3f} | {results['aurc_all_queries'][name]:.4f} | "
                     f"{pct(results['risk_at_coverage_0.8'][name])} | {pct(results['coverage_at_risk_0.05'][name])} |")
    lines += ["", "| abstain below | coverage | accuracy of answered | out-of-memory answered | in-memory abstained |",
              "|---:|---:|---:|---:|---:|"]
    for p, g in gates.items():
        acc = "—" if g["accuracy_of_answered"] is None else pct(g["accuracy_of_answered"])
        lines.append(f"| {p} | {pct(g['coverage'])} | {acc} | {g['out_of_memory_answered']} | "
                     f"{g['in_memory_abstained']} |")
    lines += ["", "| method:score | ECE raw | ECE calibrated | AUROC | AURC |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {name} | {m['ece_raw']:.4f} | {m['ece_calibrated']:.4f} | {m['auroc_in_vs_out']:.3f} | "
              f"{m['aurc_all_queries']:.4f} |" for name, m in methods.items()]
    lines += ["", f"`VisualMemory.classify(..., abstain_below={gate})` on the test embeddings abstained differently "
                  f"from the neighbour files on {api_mismatches} queries (must be 0)."]
    write_report(out, name=NAME, setup=s, results=results, markdown="\n".join(lines), seconds=ws.seconds,
                 command=s.command(NAME))
    return results
