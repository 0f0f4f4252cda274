"""Switch off each defence of SecAgg+ in turn and run the suite that attacks it (the
adversarial suite for a malicious server's attacks, the misbehaving-site suite for a lying
site's): every line must read RED (the suite catches the attack the defence stops). Run from
the repository root: `python tests/support/secagg_mutations.py` (it restores every file)."""

from __future__ import annotations

import pathlib
import subprocess
import sys

SUITE = "tests/test_secagg_adversarial.py"
SITES = "tests/test_secagg_misbehaving.py"
# (the defence: [(file, its text, what replaces it)], the test that must catch it)
MUTATIONS = [
    ([("fedcore/secagg/identity.py", "or not _site_certificate(cert)", "or False")], "real_mtls_kits"),
    (
        [("fedcore/secagg/client.py", "len(message.participants) >= self.min_cohort,", "True,")],
        "smaller_than_its_policy",
    ),
    (
        [("fedcore/secagg/common.py", "self.degree >= default_degree(n),", "True,")],
        "degree_below_the_default",
    ),
    (
        [
            (
                "fedcore/secagg/stages/reveal.py",
                "commitments.get(self.site) == nonce_commitment(p, self.site, self.nonce),",
                "True,",
            )
        ],
        "without_the_sites_own_commitment",
    ),
    (
        [
            (
                "fedcore/secagg/stages/share_keys.py",
                "set(message.nonces) == set(self.commitments)\n            and all(",
                "True or all(",
            )
        ],
        "forged_nonce",
    ),
    (
        [
            (
                "fedcore/secagg/stages/messages.py",
                '"consistency",\n        params.session,\n        params.digest,',
                '"consistency",\n        params.session,\n        params.base.digest,',
            )
        ],
        "different_commitments",
    ),
    (
        [
            (
                "fedcore/secagg/client.py",
                "count < self.max_attempts,",
                "True,",
            )
        ],
        "max_attempts",
    ),
    (
        [("fedcore/secagg/stages/unmask.py", "self._signed_by(request, identity) >= p.threshold,", "True,")],
        "different_views",
    ),
    (
        [
            (
                "fedcore/secagg/stages/unmask.py",
                "request.cohort == self.cohort\n            and request.survivors <= self.cohort\n            and not request.dropped & self.cohort,",
                "not request.survivors & request.dropped,",
            )
        ],
        "outside_the_signed_set",
    ),
    ([("fedcore/secagg/stages/share_keys.py", "and verified(identity, p, k)", "and True")], "substituted"),
    (
        [("fedcore/secagg/stages/advertise.py", "self.params.check_safe(self.site)\n", "\n")],
        "threshold_too_low",
    ),
    (
        [
            ("fedcore/secagg/common.py", "2 * self.threshold >= degree + 2", "2 * self.threshold > degree"),
            ("fedcore/secagg/graph.py", "return (degree + 3) // 2", "return degree // 2 + 1"),
        ],
        "odd_neighbourhood",
    ),
    (
        [
            (
                "fedcore/secagg/stages/consistency.py",
                "self.site in cohort and cohort <= set(p.participants)",
                "cohort <= set(p.participants)",
            )
        ],
        "claimed_dropped_after",
    ),
    (
        [
            (
                "fedcore/secagg/stages/messages.py",
                "        keys.cipher_public,\n        keys.mask_public,\n        cohort,",
                "        cohort,",
            ),
            # A redone session draws another beacon too: both bindings off.
            (
                "fedcore/secagg/stages/messages.py",
                '"consistency",\n        params.session,\n        params.digest,',
                '"consistency",\n        params.session,\n        params.base.digest,',
            ),
        ],
        "earlier_attempt",
    ),
]


# Defences against lying sites, caught by SITES.
SITE_MUTATIONS = [
    (  # the self-mask seed rebuilt is checked against its commitment
        [
            (
                "fedcore/secagg/stages/unmask.py",
                "lambda seed: seed_commitment(params, site, seed) == commitment",
                "lambda seed: True",
            )
        ],
        "another_seed",
    ),
    (  # a dropped site's key rebuilt is checked against its advertised public key
        [
            (
                "fedcore/secagg/stages/unmask.py",
                "lambda private: KeyPair.from_private(private).public == mask_public",
                "lambda private: True",
            )
        ],
        "another_key",
    ),
    (  # a released share is checked against its dealer's digest: a liar is named, not its dealer
        [
            (
                "fedcore/secagg/stages/unmask.py",
                'if share_digest(p, owner, holder, kind, y) != (pair[:32] if kind == "seed" else pair[32:]):',
                "if False:",
            )
        ],
        "crafted",
    ),
    (  # a received share is checked against its dealer's digest: its holder complains
        [
            (
                "fedcore/secagg/stages/masked_input.py",
                " and dealt(p, sender, self.site, plain) == digests.get(sender)",
                "",
            )
        ],
        "garbage",
    ),
    (  # complaints: garbage for most neighbours names the dealer in the abort
        [("fedcore/secagg/stages/unmask.py", "key_shares, self.garbage & asked)", "key_shares)")],
        "garbage",
    ),
    (  # low-order keys: detected at all
        [
            (
                "fedcore/secagg/primitives.py",
                "_PROBE.exchange(X25519PublicKey.from_public_bytes(public))",
                "X25519PublicKey.from_public_bytes(public)",
            )
        ],
        "low_order",
    ),
    (  # low-order keys: the server names their site
        [
            (
                "fedcore/secagg/stages/advertise.py",
                "elif not (valid_public(m.cipher_public) and valid_public(m.mask_public)):",
                "elif False:",
            )
        ],
        "low_order",
    ),
    (  # low-order keys: an honest site leaves their site out
        [
            (
                "fedcore/secagg/stages/share_keys.py",
                "and valid_public(k.cipher_public)\n            and valid_public(k.mask_public)\n",
                "",
            )
        ],
        "low_order",
    ),
    (  # a site with too few pairs is left out before its secrets are needed
        [
            (
                "fedcore/secagg/stages/share_keys.py",
                "short = {s for s, q in pairs.items() if len(q) < p.threshold}",
                "short: set[str] = set()",
            )
        ],
        "left_out_by_name or too_few_live",
    ),
]


def main() -> int:
    failures = 0
    runs = [(SUITE, m) for m in MUTATIONS] + [(SITES, m) for m in SITE_MUTATIONS]
    for suite, (edits, test) in runs:
        originals = {path: pathlib.Path(path).read_text() for path, _, _ in edits}
        missing = [text for path, text, _ in edits if text not in originals[path]]
        if missing:
            print(f"MISSING  {missing[0][:60]!r}: the defence text is not there any more")
            failures += 1
            continue
        for path, text, mutant in edits:
            file = pathlib.Path(path)
            file.write_text(file.read_text().replace(text, mutant, 1))
        try:
            run = subprocess.run(
                [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", suite, "-k", test],
                capture_output=True,
                text=True,
            )
        finally:
            for path, original in originals.items():
                pathlib.Path(path).write_text(original)
        red = run.returncode == 1
        failures += not red
        print(
            f"{'RED  ' if red else 'GREEN'}  {edits[0][0]}: {edits[0][1].strip().splitlines()[0][:50]} -> {test}"
        )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
