"""Switch off each malicious-server defence of SecAgg+ in turn and run the adversarial suite:
every line must read RED (the suite catches the attack the defence stops). Run from the
repository root: `python tests/support/secagg_mutations.py` (it restores every file)."""

from __future__ import annotations

import pathlib
import subprocess
import sys

SUITE = "tests/test_secagg_adversarial.py"
# (the defence: [(file, its text, what replaces it)], the test that must catch it)
MUTATIONS = [
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
            )
        ],
        "earlier_attempt",
    ),
]


def main() -> int:
    failures = 0
    for edits, test in MUTATIONS:
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
                [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", SUITE, "-k", test],
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
