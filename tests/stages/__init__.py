"""The commands end to end (cache-teacher, train-student and evaluate, sweep, export) and the options that span both stages."""
