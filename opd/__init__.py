"""opd: on-policy distillation of language models.

The package follows the survey "A Formula-Driven Survey and Research Agenda for On-Policy
Distillation" (Zhang, arXiv 2606.22793): a method is a point in the space of design variables
(state compatibility, support construction, temporal credit, vocabulary routing, gates and
weights, regularization), never a trainer class.

Layers (the README's "Layout" section):

* ``opd.math``   pure tensor functions, no models and no I/O;
* ``opd.lab``    exact-enumeration studies of the estimators (the bias lab);
* components     rollout engine, teachers, models, tasks, checkpoints, logging;
* the loop       ``opd.train``: rollout -> feedback -> objective -> step -> log/eval/save;
* the front      the ``opd`` command, presets and the built-in task.
"""

__version__ = "0.1.0"
