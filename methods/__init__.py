"""The methods of ovseg, each a subpackage."""
