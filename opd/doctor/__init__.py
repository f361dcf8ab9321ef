"""``opd doctor``: check a teacher–student pair before training on it.

* :mod:`opd.doctor.checks`, :mod:`opd.doctor.tokens` — the teacher self-test's checks (pure comparisons);
* :mod:`opd.doctor.selftest` — runs them on the configured teacher and the student's own rollouts;
* :mod:`opd.doctor.probe` — lengths, rewards, accuracies and one real step on the user's prompts;
* :mod:`opd.doctor.predict` — which failure detectors a run would fire (the monitor's own rules);
* :mod:`opd.doctor.recommend` — recommended settings, each with its measured number and its paper;
* :mod:`opd.doctor.run` — the procedure; :mod:`opd.doctor.render` — console, JSON, Markdown, HTML.

docs/doctor.md documents every check, tolerance, projection and rule.
"""
