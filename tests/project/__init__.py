"""The project as a user meets it: the documented commands, the walkthrough, the demo, --help, the installed wheel."""
