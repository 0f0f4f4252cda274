"""Switch off each malicious-server defence of SecAgg+ in turn and run the adversarial suite:
every line must read RED (the suite catches the attack the defence stops). Run from the
repository root: `python tests/support/secagg_mutations.py` (it restores every file)."""

from __future__ import annotations

import pathlib
import subprocess
import sys

SUITE = "tests/test_secagg_adversarial.py"
MUTATIONS = [  # (file, the defence, what replaces it, the test that must catch it)
    (
        "fedcore/secagg/stages/unmask.py",
        "            self._signed_by(request, identity) >= p.threshold,",
        "            True,",
        "different_views",
    ),
    (
        "fedcore/secagg/stages/unmask.py",
        "            request.cohort == self.cohort\n            and request.survivors <= self.cohort\n            and not request.dropped & self.cohort,",
        "            not request.survivors & request.dropped,",
        "outside_the_signed_set",
    ),
    (
        "fedcore/secagg/stages/share_keys.py",
        "            and verified(identity, p, k)",
        "            and True",
        "substituted",
    ),
    (
        "fedcore/secagg/stages/advertise.py",
        "        self.params.check_safe(self.site)\n",
        "",
        "threshold_too_low",
    ),
    (
        "fedcore/secagg/stages/consistency.py",
        "            self.site in cohort and cohort <= set(p.participants),",
        "            cohort <= set(p.participants),",
        "claimed_dropped_after",
    ),
    (
        "fedcore/secagg/stages/messages.py",
        "        keys.cipher_public,\n        keys.mask_public,\n        cohort,",
        "        cohort,",
        "earlier_attempt",
    ),
]


def main() -> int:
    failures = 0
    for path, defence, mutant, test in MUTATIONS:
        file = pathlib.Path(path)
        original = file.read_text()
        if defence not in original:
            print(f"MISSING  {path}: the defence text is not there any more")
            failures += 1
            continue
        file.write_text(original.replace(defence, mutant, 1))
        try:
            run = subprocess.run(
                [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", SUITE, "-k", test],
                capture_output=True,
                text=True,
            )
        finally:
            file.write_text(original)
        red = run.returncode == 1
        failures += not red
        print(f"{'RED  ' if red else 'GREEN'}  {path}: {defence.strip().splitlines()[0][:60]} -> {test}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
