// 3-D Secure: finish the bank's confirmation with Stripe.js, then ask our server for the result.
(function () {
  "use strict";
  var box = document.getElementById("three-ds");
  var form = document.getElementById("status-form");
  if (!box || !form || typeof window.Stripe !== "function") { return; }
  var status = document.getElementById("three-ds-status");
  var needsJs = document.getElementById("three-ds-needs-js");
  if (needsJs) { needsJs.hidden = true; }
  var stripe = window.Stripe(box.dataset.publishableKey);
  stripe.confirmCardPayment(box.dataset.clientSecret).then(function () {
    // Whatever the browser was told, the server asks Stripe for the truth.
    if (status) { status.textContent = status.dataset.done || "…"; }
    form.submit();
  });
})();
