"""The label convention shared by the data pipeline and the loss: positions labelled IGNORE_INDEX carry no loss."""

IGNORE_INDEX = -100
