"""Method comparison (`patchaudit bench`): a grid of configurations fitted and evaluated each in its
own process, Pareto fronts over accuracy, speed and memory, and an HTML report."""
