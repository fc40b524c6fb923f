"""Training with factored layers: `SVDTrainingArguments`, `SVDTrainer`, its callbacks, distillation, `compress`."""
