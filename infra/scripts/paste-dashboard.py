"""Pastes infra/dashboard.json into template.yaml's OperationsDashboard body (run by `make dashboard`)."""
import pathlib
import sys

root = pathlib.Path(__file__).resolve().parents[2]
template = root / "template.yaml"
body = (root / "infra" / "dashboard.json").read_text()
text = template.read_text()
start_marker = "      DashboardBody: !Sub\n        - |\n"
end_marker = "        - BrazeSyncFunctionName:"
start = text.index(start_marker) + len(start_marker)
end = text.index(end_marker, start)
block = "".join("          " + line + "\n" for line in body.splitlines())
new = text[:start] + block + text[end:]
if new != text:
    template.write_text(new)
    print("template.yaml: dashboard body updated", file=sys.stderr)
