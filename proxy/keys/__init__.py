"""Virtual keys: the key ring loaded from keys.json (keys, fields, plans), the credentials a
request presents, reloads, and the lockout of failed authentications."""
