"""
Print the test modules that can run without the openai SDK (for PyPy, where
it does not install): all but those importing openai (or pydantic, which
comes with it), or importing a test module that does, however indirectly.
"""

import pathlib
import re

texts = {p.stem: p.read_text() for p in pathlib.Path("tests").glob("test_*.py")}
left_out = {
    name
    for name, text in texts.items()
    if re.search(r"^(import|from) (openai|pydantic)(\.| |$)", text, re.M)
}
while True:
    more = {
        name
        for name, text in texts.items()
        if name not in left_out
        and any(f"from tests.{other} import" in text for other in left_out)
    }
    if not more:
        break
    left_out |= more
print(" ".join(f"tests.{name}" for name in sorted(texts) if name not in left_out))
