//! Presence: who is online, on which edge, with which devices.
