"""oaproxy: one stable OpenAI-compatible endpoint in front of many upstreams."""
