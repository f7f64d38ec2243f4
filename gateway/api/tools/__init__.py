"""Tool calls: the request's tools and tool_choice (`request.py`), and one parser per model
output format (`hermes.py`, `llama3.py`, `mistral.py`, `forced.py`) behind `ToolParser`
(`parser.py`), reading calls written as JSON objects (`json_object.py`) and their arguments
(`arguments.py`)."""
