"""The site agent: `fedcore client`."""
