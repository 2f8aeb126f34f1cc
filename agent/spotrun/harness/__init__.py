"""The proving harness, never shipped (packaging/exclude.txt): `spotrun rehearse` (a job
run through its interruptions on the local spot cloud, with a report), `spotrun soak`
(many jobs under injected faults, judged by invariant checkers from the cloud's own
record and the volume images), the sweep witness, and the counting trainer they train."""
