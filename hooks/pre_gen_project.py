"""The answers once more, before anything is written, for bakes that skip the prompts (--replay).

A normal bake checks each answer as it is given (hooks/answers.py, through cookiecutter.json), so
nothing reaches this hook that it would reject.
"""

import json
import sys

# Each answer arrives as JSON text in a raw string (tojson escapes every quote), so no answer can
# break out of this file's syntax.
ANSWERS = json.loads(r'{{ cookiecutter | tojson }}')
sys.path.insert(0, json.loads(r'{{ template_dir | tojson }}'))

from hooks.answers import first_problem, stop  # after the template folder is importable

if __name__ == "__main__":
    message = first_problem(ANSWERS)
    if message is not None:
        stop(message)
