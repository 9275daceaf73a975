"""``ceremony run --dry-run``: what a session would do and cost, before anything is proposed.

The checks are the peers' own (:func:`peer.payloads.training.check_training_proposal`), run
here on the operator's machine: a file that fails them fails here with the same message.
What only a site knows (its data, its policy, the privacy it already spent) is not checked:
the epsilon shown is what *this session alone* costs a site, which depends on the site's
number of training records (the Poisson sampling rate is batch_size / records). Give them
with ``--records peer=N`` when the sites told you; otherwise a table over typical sizes.
"""

from __future__ import annotations

from collections.abc import Mapping

from ..session import SessionProposal

__all__ = ["TYPICAL_RECORDS", "dry_run_lines"]

TYPICAL_RECORDS = (100, 300, 1000, 10000)


def dry_run_lines(proposal: SessionProposal, records: Mapping[str, int]) -> list[str]:
    """The dry-run report of ``proposal``, as lines.

    Raises:
        ProposalError: a check every peer would fail (the reason).
    """
    n = len(proposal.participants)
    lines = [
        f"session {proposal.session_id}: payload {proposal.payload_kind}, "
        f"{proposal.rounds} rounds, {n} participants ({', '.join(proposal.participants)}), "
        f"threshold {proposal.threshold}, ring {proposal.bits} bits, {proposal.aggregation}",
    ]
    if proposal.payload_kind != "training":
        lines.append("no training payload: no model and no DP-SGD privacy to show")
        return lines
    from ..payloads.training import check_training_proposal
    from ..training.accounting import GLOBAL_DELTA

    spec = check_training_proposal(proposal)
    if spec.image is not None:
        h, w, c = spec.image.shape
        data = f"{h}x{w}x{c} images ({spec.image.normalization})"
    else:
        data = f"{spec.input_dim} features per record"
    lines += [
        f"model: {spec.model}, {spec.n_parameters():,} parameters",
        "task: binary (one logit, sigmoid cross-entropy)",
        f"data: {data}, at most {spec.max_records:,} training records per site",
        f"rounds: 1 standardization, {spec.training_rounds} training "
        f"({spec.local_steps} DP-SGD steps each, expected batch {spec.batch_size}), "
        "1 final evaluation",
        f"epsilon of this session alone (PLD, delta {GLOBAL_DELTA:g}; each site adds it to "
        "what it already spent and refuses beyond its own budget):",
    ]
    unknown = [p for p in proposal.participants if p not in records]
    for peer in proposal.participants:
        if peer in records:
            cost = spec.session_epsilon(records[peer])
            lines.append(f"  {peer:<20} {records[peer]:>8} training records  epsilon {cost:.3g}")
    if unknown:
        sizes = "  ".join(f"{size:>7}" for size in TYPICAL_RECORDS)
        eps = "  ".join(f"{spec.session_epsilon(size):>7.3g}" for size in TYPICAL_RECORDS)
        lines += [
            f"  {', '.join(unknown)}: records not given (--records PEER=N); by training records:",
            f"  {'records':<8} {sizes}",
            f"  {'epsilon':<8} {eps}",
        ]
    lines.append("nothing was proposed (--dry-run)")
    return lines
