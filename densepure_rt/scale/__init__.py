"""Scale-out: the work of one image (shared by the CLI and the actors) and Ray actors."""
