"""Shared expectations for the ReAct tests, written out literally (not built
with qwen_vllm's templates) so a drifted Qwen prompt string fails a test."""

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city"],
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "description": "The time.", "parameters": {"type": "object"}}}
WEATHER_PARAMS = (
    '{"type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string", '
    '"enum": ["celsius", "fahrenheit"]}}, "required": ["city"]}'
)
# Qwen's openai_api.py instruction for WEATHER alone.
WEATHER_INSTRUCTION = (
    "Answer the following questions as best you can. You have access to the following APIs:\n\n"
    "get_weather: Call this tool to interact with the get_weather API. What is the get_weather API useful for? "
    "Get the current weather in a city. Parameters: " + WEATHER_PARAMS + "\n\n"
    "Use the following format:\n\n"
    "Question: the input question you must answer\n"
    "Thought: you should always think about what to do\n"
    "Action: the action to take, should be one of [get_weather]\n"
    "Action Input: the input to the action\n"
    "Observation: the result of the action\n"
    "... (this Thought/Action/Action Input/Observation can be repeated zero or more times)\n"
    "Thought: I now know the final answer\n"
    "Final Answer: the final answer to the original input question\n\n"
    "Begin!"
)
ARGS = '{"city": "Paris", "unit": "celsius"}'
THOUGHT = "I need the current weather in Paris."
FINAL_ANSWER = "It is 22 degrees and sunny in Paris."
