"""``ceremony stats``: federated differentially private statistics over the peers' patients.

Proposes a one-round ``statistics`` session (:mod:`peer.payloads.statistics`) to the participants of
``federation.toml``, exactly as ``ceremony run`` proposes a training session: each peer checks
the queries against its policy and its remaining privacy budget, answers them locally with
DP noise, and the answers are summed by secure aggregation and signed by every peer. What is
printed comes from the peers' ledgers (the agreed record), never from one peer's say-so.

The queries come from a JSON file or from shorthand options (which can be combined)::

    ceremony stats --federation federation.toml --epsilon 0.5 --count-by-diagnosis
    ceremony stats --federation federation.toml --epsilon 1 \\
        --histogram "mean radius:5,10,15,20,30" --mean "mean area:0:3000"
    ceremony stats --federation federation.toml --epsilon 1 --query queries.json

``queries.json`` is a list of queries, or an object with ``queries`` (and optionally
``max_records``, ``split``, ``epsilon``), in the statistics payload format::

    [{"name": "diagnoses", "type": "count", "categories": ["benign", "malignant"]},
     {"name": "radius", "type": "histogram", "feature": "mean radius", "edges": [5, 10, 20, 30]},
     {"name": "area", "type": "mean", "feature": "mean area", "bounds": [0, 3000], "weight": 2}]

``--epsilon`` is what *each hospital* spends on the whole session, split across the queries
by weight. Noisy counts are off by a few and a tiny cell can even come out negative: that
is the honest, unbiased estimate. The ``[session]`` table of ``federation.toml`` is optional here:
its participants, threshold, graph and timeouts are used; its payload and rounds are not.

Exit codes: 0 when the peers agreed on the answers, 1 when a peer refused (each peer's reason
is printed; e.g. its privacy budget is spent) or the session did not finish, 2 for bad input.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from peer.cli import EXIT_FAILED, EXIT_OK, UsageError
from peer.operator import (
    FederationFile,
    SessionOutcome,
    build_proposal,
    default_session_id,
    load_federation,
)

from .ceremony_run import connect, propose_and_follow

if TYPE_CHECKING:
    from peer.identity import Roster
    from peer.payloads.statistics import StatisticsSpec
    from peer.session import SessionProposal

__all__ = [
    "DEFAULT_CATEGORIES",
    "add_parsers",
    "histogram_query",
    "mean_query",
    "statistics_proposal",
    "statistics_spec",
]

# The bundled data set's diagnoses (peer.data.breast_cancer_records), the default of
# --count-by-diagnosis. CSV imports store their own diagnosis texts: name those instead.
DEFAULT_CATEGORIES = ("benign", "malignant")
_FILE_KEYS = frozenset({"kind", "queries", "max_records", "split", "epsilon", "length"})


# --------------------------------------------------------------------------- the queries


def histogram_query(text: str) -> dict[str, Any]:
    """The query of ``--histogram FEATURE:EDGES`` (edges comma-separated, increasing).

    The feature name may itself hold colons: the edges are after the last one.

    Raises:
        UsageError: no colon, or an edge that is not a number.
    """
    feature, sep, edges_text = text.rpartition(":")
    if not sep or not feature:
        raise UsageError(
            f"--histogram {text!r}: expected FEATURE:EDGES, e.g. 'mean radius:5,10,15,20'"
        )
    try:
        edges = [float(edge) for edge in edges_text.split(",")]
    except ValueError:
        raise UsageError(
            f"--histogram {text!r}: EDGES must be comma-separated numbers, not {edges_text!r}"
        ) from None
    return {"name": f"{feature} histogram", "type": "histogram", "feature": feature, "edges": edges}


def mean_query(text: str) -> dict[str, Any]:
    """The query of ``--mean FEATURE:LO:HI`` (values are clipped to ``[LO, HI]``).

    Raises:
        UsageError: not three parts, or a bound that is not a number.
    """
    parts = text.rsplit(":", 2)
    if len(parts) != 3 or not parts[0]:
        raise UsageError(f"--mean {text!r}: expected FEATURE:LO:HI, e.g. 'mean area:0:3000'")
    feature, low, high = parts
    try:
        bounds = [float(low), float(high)]
    except ValueError:
        raise UsageError(f"--mean {text!r}: LO and HI must be numbers") from None
    return {"name": f"{feature} mean", "type": "mean", "feature": feature, "bounds": bounds}


def _load_query_file(path: Path) -> dict[str, Any]:
    """The file's queries (and settings) as a partial statistics payload."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"--query {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"--query {path}: cannot read: {error}") from None
    except json.JSONDecodeError as error:
        raise UsageError(f"--query {path}: not valid JSON: {error}") from None
    if isinstance(document, list):
        return {"queries": document}
    if not isinstance(document, dict) or "queries" not in document:
        raise UsageError(f"--query {path}: expected a list of queries or an object with 'queries'")
    unknown = sorted(set(document) - _FILE_KEYS)
    if unknown:
        raise UsageError(f"--query {path}: unknown keys {unknown} (allowed: {sorted(_FILE_KEYS)})")
    return dict(document)


def statistics_spec(
    *,
    epsilon: float | None,
    query_file: Path | None = None,
    count_categories: Sequence[str] | None = None,
    histograms: Sequence[str] = (),
    means: Sequence[str] = (),
    max_records: int | None = None,
    split: str | None = None,
) -> StatisticsSpec:
    """The :class:`~peer.payloads.statistics.StatisticsSpec` the command line asks for.

    Options given on the command line win over the same settings in ``query_file``.

    Raises:
        UsageError: no query, both a file and shorthands, no epsilon, or a spec that
            :meth:`StatisticsSpec.from_payload` rejects (its message names the query).
    """
    from peer.payloads.statistics import STATISTICS_KIND, StatisticsSpec, StatisticsSpecError

    shorthand: list[dict[str, Any]] = []
    if count_categories is not None:
        categories = list(count_categories) or list(DEFAULT_CATEGORIES)
        shorthand.append({"name": "diagnoses", "type": "count", "categories": categories})
    shorthand += [histogram_query(text) for text in histograms]
    shorthand += [mean_query(text) for text in means]
    if query_file is not None and shorthand:
        raise UsageError(
            "give the queries either in --query FILE or as --count-by-diagnosis/--histogram/"
            "--mean, not both"
        )
    if query_file is None and not shorthand:
        raise UsageError("no query: give --query FILE, --count-by-diagnosis, --histogram or --mean")
    payload: dict[str, Any] = (
        _load_query_file(query_file) if query_file is not None else {"queries": shorthand}
    )
    payload["kind"] = payload.get("kind", STATISTICS_KIND)
    for key, value in (("epsilon", epsilon), ("max_records", max_records), ("split", split)):
        if value is not None:
            payload[key] = value
    if "epsilon" not in payload:
        raise UsageError("--epsilon is required (the epsilon each hospital spends)")
    try:
        return StatisticsSpec.from_payload(payload)
    except StatisticsSpecError as error:
        where = f"--query {query_file}: " if query_file is not None else ""
        raise UsageError(f"{where}{error}") from None


def statistics_proposal(
    federation: FederationFile, roster: Roster, spec: StatisticsSpec, session_id: str
) -> SessionProposal:
    """A one-round statistics session for ``federation``'s participants.

    The ``[session]`` table's participants, threshold, graph and timeouts apply; its payload
    and rounds do not (asking the same queries again would only spend more epsilon).

    Raises:
        OperatorError: as :func:`peer.operator.build_proposal`.
    """
    session = {**federation.session, "payload": spec.to_payload(), "rounds": 1}
    session.pop("privacy", None)  # DP-SGD settings; statistics carry their own epsilon
    return build_proposal(replace(federation, session=session), roster, session_id=session_id)


# --------------------------------------------------------------------------- output


def _number(value: object) -> str:
    if isinstance(value, float) and value.is_integer():
        return f"{value:.0f}"
    if isinstance(value, float):
        return f"{value:.6g}"
    return "n/a" if value is None else str(value)


def _print_statistics(statistics: Mapping[str, Any], out: TextIO) -> None:
    for name, result in statistics.items():
        kind = result.get("type")
        print(f"{name} ({kind}, epsilon {result.get('epsilon', 0.0):.4g}):", file=out)
        if kind == "count":
            counts = result.get("counts", {})
            width = max((len(c) for c in counts), default=0)
            for category, count in counts.items():
                print(f"  {category:<{width}}  {_number(count):>8}", file=out)
        elif kind == "histogram":
            edges = result.get("edges", [])
            counts = result.get("counts", [])
            # numpy.histogram's bins: half-open, except the last, which holds its upper edge.
            bins = list(itertools.pairwise(float(edge) for edge in edges))
            labels = [
                f"[{_number(lo)}, {_number(hi)}" + ("]" if i == len(bins) - 1 else ")")
                for i, (lo, hi) in enumerate(bins)
            ]
            width = max((len(label) for label in labels), default=0)
            for label, count in zip(labels, counts, strict=False):
                print(f"  {label:<{width}}  {_number(count):>8}", file=out)
        elif kind == "mean":
            lower, upper = result.get("bounds", [None, None])
            print(
                f"  mean {_number(result.get('mean'))} over {_number(result.get('count'))} "
                f"patients (values clipped to [{_number(lower)}, {_number(upper)}])",
                file=out,
            )
        else:
            print(f"  {json.dumps(result, sort_keys=True)}", file=out)


def _statistics_of(outcome: SessionOutcome) -> Mapping[str, Any] | None:
    if not outcome.rows:
        return None
    found = outcome.rows[-1].metrics.get("statistics")
    return found if isinstance(found, Mapping) else None


def _print_outcome(outcome: SessionOutcome, federation: Path, out: TextIO) -> None:
    statistics = _statistics_of(outcome)
    if outcome.rows:
        row = outcome.rows[-1]
        print(
            f"session {outcome.session_id}: agreed by {len(row.held_by)} ledgers, "
            f"{row.signatures} valid signatures, {len(row.survivors)}/{len(row.participants)} "
            f"hospitals contributed"
            + (f" (dropped: {', '.join(row.dropped)})" if row.dropped else ""),
            file=out,
        )
        spent = ", ".join(f"{p} {e:.4g}" for p, e in sorted(row.epsilon.items()))
        print(f"epsilon spent: {spent or '-'}", file=out)
        if row.differs:
            print(f"WARNING: {', '.join(row.differs)} hold a different record", file=out)
    else:
        print(f"session {outcome.session_id}: no result was agreed", file=out)
    if statistics is not None:
        _print_statistics(statistics, out)
        print(
            "(DP noise is unbiased: counts may be off by a few, even negative for tiny cells)",
            file=out,
        )
    states = ", ".join(f"{p} {s}" for p, s in sorted(outcome.states.items()))
    if not outcome.ok:
        print(f"peers: {states or '-'}", file=out)
    for peer, reason in sorted(outcome.unreachable.items()):
        print(f"not answering: {peer}: {reason}", file=out)
    if outcome.timed_out:
        print(
            f"still running on the peers; wait for it again with: ceremony stats --attach "
            f"{outcome.session_id} --federation {federation}",
            file=out,
        )


# --------------------------------------------------------------------------- command


def _plain(text: str) -> str:
    """Docstring text for ``--help``: reST roles and literals as plain text."""
    return re.sub(r":\w+:`([^`]*)`", r"\1", text).replace("``", "").replace("::", ":").strip()


def _add_stats(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "stats",
        help="federated DP statistics: counts per diagnosis, histograms, means",
        description=_plain((__doc__ or "").split("\n\n", 1)[1].split("The queries come", 1)[0]),
        epilog=_plain("The queries come" + (__doc__ or "").split("The queries come", 1)[1]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--federation",
        type=Path,
        required=True,
        metavar="federation.toml",
        help="the operator's certificate, key, CA and roster (and optionally [session])",
    )
    parser.add_argument(
        "--query", type=Path, metavar="QUERY.json", help="the queries, as JSON (see below)"
    )
    parser.add_argument(
        "--count-by-diagnosis",
        nargs="*",
        metavar="DIAGNOSIS",
        help="count patients per diagnosis (default diagnoses: "
        f"{' '.join(DEFAULT_CATEGORIES)}, those of the bundled data set)",
    )
    parser.add_argument(
        "--histogram",
        action="append",
        default=[],
        metavar="FEATURE:EDGES",
        help="histogram of a feature over comma-separated bin edges (repeatable)",
    )
    parser.add_argument(
        "--mean",
        action="append",
        default=[],
        metavar="FEATURE:LO:HI",
        help="mean of a feature, values clipped to [LO, HI] (repeatable)",
    )
    parser.add_argument(
        "--epsilon",
        type=float,
        metavar="E",
        help="epsilon each hospital spends on the session (split across the queries)",
    )
    parser.add_argument(
        "--max-records",
        type=int,
        metavar="N",
        help="the largest hospital's patient count, for the encoding (default 100000)",
    )
    parser.add_argument(
        "--split", choices=("all", "train", "test"), help="which records (default all)"
    )
    parser.add_argument("--session-id", metavar="ID", help="default: stats-<UTC time>-<random>")
    parser.add_argument(
        "--attach",
        metavar="SESSION",
        help="wait for a statistics session that was already proposed (no queries needed)",
    )
    parser.add_argument("--timeout", type=float, metavar="S", help="stop waiting after S seconds")
    parser.add_argument("--json", action="store_true", help="print one JSON object at the end")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    parser.set_defaults(handler=_cmd_stats)


def _cmd_stats(args: argparse.Namespace) -> int:

    if args.attach:
        if args.session_id and args.session_id != args.attach:
            raise UsageError("--attach names the session; leave out --session-id")
        # Only the participants and timeouts matter when attaching: any valid spec will do.
        spec = statistics_spec(epsilon=1.0, count_categories=())
    else:
        spec = statistics_spec(
            epsilon=args.epsilon,
            query_file=args.query,
            count_categories=args.count_by_diagnosis,
            histograms=args.histogram,
            means=args.mean,
            max_records=args.max_records,
            split=args.split,
        )
    federation = load_federation(args.federation, payload_required=False)
    client = connect(federation)
    sid = (
        args.attach
        or args.session_id
        or default_session_id(datetime.now(UTC)).replace("session-", "stats-", 1)
    )
    proposal = statistics_proposal(federation, client.roster, spec, sid)
    outcome = propose_and_follow(
        client,
        proposal,
        attach=bool(args.attach),
        timeout=args.timeout,
        quiet=args.quiet,
        json_output=args.json,
        what="statistics session",
        started=f"({len(spec.queries)} queries, epsilon {spec.epsilon:g} each)",
        again=f"Wait again with: ceremony stats --attach {sid} --federation {args.federation}",
    )
    if isinstance(outcome, int):
        return outcome
    statistics = _statistics_of(outcome)
    ok = outcome.ok and statistics is not None
    if args.json:
        report = outcome.as_json()
        report.update(ok=ok, statistics=statistics, refused={})
        print(json.dumps(report, sort_keys=True))
    else:
        _print_outcome(outcome, args.federation, sys.stdout)
    return EXIT_OK if ok else EXIT_FAILED


def add_parsers(subparsers: Any) -> None:
    """Register ``stats`` on ``ceremony``'s subparsers."""
    _add_stats(subparsers)
