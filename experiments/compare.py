"""Compare two trained models on the same held-out diseases: the paired difference of each score.

    python -m experiments.compare RUN_A RUN_B     (run ids, version numbers or models:/ URIs)
"""

import sys

from experiments._cli import ArgumentParser, positive_int, quiet_libraries, run_cli


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m experiments.compare",
                            description=__doc__.strip().splitlines()[0])
    parser.add_argument("a", metavar="A", help="the first model: a run id, a version number of "
                        "--registered-model, or a models:/ or runs:/ URI; or several, "
                        "comma-separated (training seeds of one recipe: their answers pooled)")
    parser.add_argument("b", metavar="B", help="the second model, the same ways; differences "
                        "are B - A")
    parser.add_argument("--registered-model", default="medlm",
                        help="the registered model a bare version number is of "
                             "(default: %(default)s)")
    parser.add_argument("--show", type=positive_int, default=10, metavar="N",
                        help="the N diseases where the two differ most (default: %(default)s)")
    parser.add_argument("--output", metavar="FILE.csv", default=None,
                        help="write the per-disease table there too")
    parser.add_argument("--log", action="store_true",
                        help="log the comparison as an MLflow run of its own in the experiment "
                             "of A (tables compare.csv and compare_diseases.csv)")
    return parser


def print_comparison(a, b, scores, per_disease, show: int) -> None:
    from medlm.scores import CONFIDENCE

    for label, side in (("A", a), ("B", b)):
        params, plural = side.runs[0].data.params, "s" if len(side.runs) > 1 else ""
        runs = ", ".join(run.info.run_id for run in side.runs)
        seeds = " ".join(str(run.data.params.get("seed")) for run in side.runs)
        print(f"{label}: {side.asked} (run{plural} {runs}: {params.get('model')}, recipe "
              f"{params.get('recipe', '?')}, seed{plural} {seeds}"
              f"{', answers pooled' if plural else ''})")
    print(f"{len(per_disease)} held-out diseases in {per_disease['group'].nunique()} name "
          f"groups, the same for both; B - A with its {CONFIDENCE:.0%} interval (name groups "
          "resampled) and a paired permutation p-value:")
    interval = f"{CONFIDENCE:.0%} CI"
    shown = scores.assign(**{
        "B - A": scores["difference"].map("{:+.4f}".format),
        interval: [f"{low:+.4f}..{high:+.4f}" for low, high
                   in zip(scores["ci_low"], scores["ci_high"], strict=True)],
        "p": scores["p_value"].map("{:.4f}".format)})
    print(shown[["score", "A", "B", "B - A", interval, "p"]]
          .to_string(index=False, float_format="{:.4f}".format))
    print(f"\nthe {min(show, len(per_disease))} diseases where they differ most (symptom F1):")
    top = per_disease.head(show).assign(generated_a=lambda t: t["generated_a"].str.slice(0, 45),
                                        generated_b=lambda t: t["generated_b"].str.slice(0, 45))
    print(top.drop(columns="group").to_string(index=False, float_format="{:.4f}".format))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_libraries()

    from medlm.compare import check_comparable, compare, load_side, log_comparison
    from medlm.metrics import METRIC_VERSION
    from medlm.store import check_tracking_store

    check_tracking_store()
    a, b = (load_side(asked, args.registered_model) for asked in (args.a, args.b))
    check_comparable(a, b)
    older = [run.info.run_id for side in (a, b) for run in side.runs
             if run.data.params.get("metric_version") != METRIC_VERSION]
    if older:
        print(f"note: run(s) {', '.join(older)} logged their scores under an older metric "
              f"version; all answers are scored here by today's rules (version "
              f"{METRIC_VERSION}), so A and B differ from what those runs logged",
              file=sys.stderr)
    scores, per_disease = compare(a, b)
    print_comparison(a, b, scores, per_disease, args.show)
    if args.output:
        per_disease.to_csv(args.output, index=False)
    if args.log:
        print(f"logged as run {log_comparison(a, b, scores, per_disease)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
