"""One router per resource: predictions, the model, health, the V2 protocol, the page."""
