"""Side memories (knowledge edits, WISE): the slots inside the forward pass, their files, their training."""
