"""Second opinions on low-margin votes: the re-rank request/outcome types, the cost gate, and re-rankers.

`base` (requests, outcomes, the gate, the response cache), `gemini` (a Gemini model through google-genai),
`second_opinion` (a second encoder).
"""
