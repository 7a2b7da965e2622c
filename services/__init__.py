"""The Greyproxy service processes: proxy, api, recorder, maintenance."""
