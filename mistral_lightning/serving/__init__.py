"""`mistral-lightning serve`: the OpenAI chat-completions and completions API on LitServe."""
