"""``python -m livecell_ray.cli``."""

from livecell_ray.cli import main

main()
