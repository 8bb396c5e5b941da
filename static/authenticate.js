// 3-D Secure: finish the bank's confirmation with Stripe.js, then ask our server for the result.
// Stripe.js is loaded from here, so that a slow network shows "opening…" and only a failed load (its
// error event, or no answer in LOAD_TIMEOUT_MS) says so; the customer can then pay with another card.
(function () {
  "use strict";
  var LOAD_TIMEOUT_MS = 20000;
  var box = document.getElementById("three-ds");
  var form = document.getElementById("status-form");
  if (!box || !form) { return; }
  var status = document.getElementById("three-ds-status");
  var problem = document.getElementById("three-ds-error");
  var started = false;

  function tell(message, detail) {
    if (detail) { console.error("paylink: 3-D Secure", detail); }
    if (status) { status.hidden = true; }
    problem.textContent = message;
    problem.hidden = false;
    problem.focus();
  }

  function confirmWithBank() {
    if (started) { return; }
    if (typeof window.Stripe !== "function") { tell(box.getAttribute("data-load-failed"), "Stripe.js is not available"); return; }
    started = true;
    if (problem) { problem.hidden = true; }
    if (status) { status.hidden = false; }
    var stripe;
    try {
      stripe = window.Stripe(box.getAttribute("data-publishable-key"), { locale: document.documentElement.lang || "auto" });
    } catch (error) {
      tell(box.getAttribute("data-load-failed"), error);
      return;
    }
    stripe.confirmCardPayment(box.getAttribute("data-client-secret")).then(function (result) {
      if (result && result.error) {
        // The bank's check did not succeed (or could not run): say so in the customer's language;
        // "check my payment" and "pay with another card" are right below.
        tell(box.getAttribute("data-failed"), result.error);
        return;
      }
      // Whatever the browser was told, the server asks Stripe for the truth.
      if (status) { status.textContent = status.getAttribute("data-done") || "…"; }
      form.submit();
    }, function (error) { tell(box.getAttribute("data-failed"), error); });
  }

  if (typeof window.Stripe === "function") { confirmWithBank(); return; }
  var script = document.createElement("script");
  var timer = window.setTimeout(function () {
    if (!started) { tell(box.getAttribute("data-load-failed"), "Stripe.js did not load in time"); }
  }, LOAD_TIMEOUT_MS);
  script.src = box.getAttribute("data-stripe-js");
  script.async = true;
  script.addEventListener("load", function () { window.clearTimeout(timer); confirmWithBank(); });
  script.addEventListener("error", function () {
    window.clearTimeout(timer);
    tell(box.getAttribute("data-load-failed"), "Stripe.js failed to load");
  });
  document.head.appendChild(script);
})();
